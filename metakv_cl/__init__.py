"""metakv-cl: continual learning of language models with Meta-KV attention."""

from metakv_cl import _compat

_compat.ensure_torchvision_ops()
_compat.silence_dependency_notices()

from metakv_cl.modeling import MetaKVConfig, add_meta_kv  # noqa: E402  (after the import fix)

__version__ = "0.1.0"
__all__ = ["MetaKVConfig", "add_meta_kv", "__version__"]
