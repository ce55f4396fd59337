"""Meta-KV models: K/V projections modulated by a meta-state, for transformers causal LMs."""

from metakv_cl.modeling.config import DYNAMIC_SOURCES, FORMS, SOURCES, MetaKVConfig
from metakv_cl.modeling.io import load_meta_kv, save_meta_kv
from metakv_cl.modeling.meta_kv import (
    MetaKV,
    SlotReadRecorder,
    add_meta_kv,
    compile_meta_kv,
    freeze_base,
    get_meta_kv,
    has_meta_kv,
    merge_and_remove_meta_kv,
    merge_meta_kv,
    meta_kv_parameters,
    remove_meta_kv,
    unmerge_meta_kv,
)
from metakv_cl.modeling.model import MetaKVModel, get_meta_kv_model, load_meta_kv_model

__all__ = [
    "DYNAMIC_SOURCES",
    "FORMS",
    "SOURCES",
    "MetaKV",
    "MetaKVConfig",
    "MetaKVModel",
    "SlotReadRecorder",
    "add_meta_kv",
    "compile_meta_kv",
    "freeze_base",
    "get_meta_kv",
    "get_meta_kv_model",
    "has_meta_kv",
    "load_meta_kv",
    "load_meta_kv_model",
    "merge_and_remove_meta_kv",
    "merge_meta_kv",
    "meta_kv_parameters",
    "remove_meta_kv",
    "save_meta_kv",
    "unmerge_meta_kv",
]
