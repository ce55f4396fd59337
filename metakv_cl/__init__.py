"""metakv-cl: continual learning of language models with Meta-KV attention."""

from metakv_cl import _compat

_compat.ensure_torchvision_ops()

__version__ = "0.1.0"
