"""metakv-cl: continual learning of language models with Meta-KV attention.

Importing the package loads no torch, Lightning, Avalanche or transformers (the command line's
``--help`` stays fast); :data:`MetaKVConfig` and :func:`add_meta_kv` load on first use.
"""

from metakv_cl import _compat

_compat.fix_torchvision_on_import()
_compat.silence_dependency_notices()

__version__ = "0.1.0"
__all__ = ["MetaKVConfig", "add_meta_kv", "__version__"]


def __getattr__(name: str):
    if name in ("MetaKVConfig", "add_meta_kv"):
        from metakv_cl import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'metakv_cl' has no attribute {name!r}")
