"""Meta-KV models: K/V projections modulated by a meta-state, for transformers causal LMs."""

from metakv_cl.modeling.config import DYNAMIC_SOURCES, FORMS, SOURCES, MetaKVConfig
from metakv_cl.modeling.io import from_pretrained, load_meta_kv, save_meta_kv, save_pretrained
from metakv_cl.modeling.meta_kv import (
    MetaKV,
    add_meta_kv,
    compile_meta_kv,
    freeze_base,
    get_meta_kv,
    has_meta_kv,
    merge_meta_kv,
    meta_kv_parameters,
    remove_meta_kv,
    unmerge_meta_kv,
)

__all__ = [
    "DYNAMIC_SOURCES",
    "FORMS",
    "SOURCES",
    "MetaKV",
    "MetaKVConfig",
    "add_meta_kv",
    "compile_meta_kv",
    "freeze_base",
    "from_pretrained",
    "get_meta_kv",
    "has_meta_kv",
    "load_meta_kv",
    "merge_meta_kv",
    "meta_kv_parameters",
    "remove_meta_kv",
    "save_meta_kv",
    "save_pretrained",
    "unmerge_meta_kv",
]
