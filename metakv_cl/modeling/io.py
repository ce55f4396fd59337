"""Saving and loading Meta-KV parameters next to (or together with) a base model.

Layout of a Meta-KV directory:
    meta_kv_config.json      the MetaKVConfig
    meta_kv.safetensors      every Meta-KV parameter (keys as in ``model.meta_kv.state_dict()``)
and, when written by :func:`save_pretrained`, the base model's own files (config.json,
model.safetensors, tokenizer files if given) without any Meta-KV keys.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.meta_kv import add_meta_kv, get_meta_kv, has_meta_kv

CONFIG_FILE = "meta_kv_config.json"
WEIGHTS_FILE = "meta_kv.safetensors"


def save_meta_kv(model: nn.Module, directory: str | Path) -> Path:
    """Write the Meta-KV config and parameters of ``model`` to ``directory``.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_kv = get_meta_kv(model)
    meta_kv.config.save(directory / CONFIG_FILE)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in meta_kv.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    return directory


def load_meta_kv(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load Meta-KV parameters saved by :func:`save_meta_kv` into ``model``.

    Adds Meta-KV with the saved config if the model has none. Raises ``FileNotFoundError``
    when the files are missing and ``ValueError`` when the saved config differs from the
    model's.
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no Meta-KV checkpoint in {directory}: {name} is missing")
    config = MetaKVConfig.load(directory / CONFIG_FILE)
    if not has_meta_kv(model):
        add_meta_kv(model, config)
    meta_kv = get_meta_kv(model)
    if meta_kv.config != config:
        raise ValueError(f"saved Meta-KV config {config} differs from the model's {meta_kv.config}")
    was_merged = meta_kv.merged
    if was_merged:
        meta_kv.set_merged(False)
    meta_kv.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(next(meta_kv.parameters()).device)))
    if was_merged:
        meta_kv.set_merged(True)
    return model


def save_pretrained(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Save the base model (transformers format, no Meta-KV keys) and its Meta-KV parameters.

    A merged model is saved unmerged, so the base weights on disk are the original ones.
    """
    directory = Path(directory)
    meta_kv = get_meta_kv(model)
    was_merged = meta_kv.merged
    if was_merged:
        meta_kv.set_merged(False)
    try:
        base_state = {k: v for k, v in model.state_dict().items() if not k.startswith("meta_kv.")}
        model.save_pretrained(directory, state_dict=base_state)
        save_meta_kv(model, directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    finally:
        if was_merged:
            meta_kv.set_merged(True)
    return directory


def from_pretrained(name_or_path: str | Path, meta_kv_config: MetaKVConfig | None = None, **load_kwargs) -> nn.Module:
    """Load a causal LM with Meta-KV.

    Args:
        name_or_path: a directory written by :func:`save_pretrained` (base model plus Meta-KV
            files), or any model :func:`metakv_cl.hub.load_causal_lm` loads (hub name, local
            directory, GGUF via ``gguf_file=``, ``"smollm2-135m"``), which then gets a fresh
            Meta-KV with ``meta_kv_config``.
        meta_kv_config: config for a fresh Meta-KV; ignored when the directory holds one.
        **load_kwargs: passed to :func:`metakv_cl.hub.load_causal_lm`.
    """
    from metakv_cl.hub import load_causal_lm

    model = load_causal_lm(str(name_or_path), **load_kwargs)
    if (Path(name_or_path) / CONFIG_FILE).is_file():
        return load_meta_kv(model, name_or_path)
    return add_meta_kv(model, meta_kv_config or MetaKVConfig())
