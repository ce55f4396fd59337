"""Saving and loading Meta-KV parameters next to (or together with) a base model.

Layout of a Meta-KV directory:
    meta_kv_config.json      ``{"meta_kv": <the MetaKVConfig>, "base_model": {"model_type": ...,
                             "architecture": ..., "name_or_path": ...},
                             "weights_sha256": <sha256 of meta_kv.safetensors>}``
    meta_kv.safetensors      every Meta-KV parameter (keys as in ``model.meta_kv.state_dict()``)
and, when :meth:`MetaKVModel.save_pretrained` is asked to, the base model's own files
(config.json, model.safetensors, tokenizer files if given) without any Meta-KV keys.

Loading verifies the checksum (a changed or damaged weights file is refused, not loaded), the
base model type and its architecture class (Meta-KV weights of a GPT-2 do not load into a Llama
of the same shape).
A config written before these records existed (the bare MetaKVConfig) still loads, with a
warning that nothing could be verified.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from metakv_cl.files import read_json
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
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in meta_kv.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    record = {
        "meta_kv": meta_kv.config.to_dict(),
        "base_model": base_model_record(model),
        "weights_sha256": _sha256(directory / WEIGHTS_FILE),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def base_model_record(model: nn.Module) -> dict[str, str | None]:
    """What a Meta-KV save records of its base model: type, architecture class and origin."""
    return {
        "model_type": _model_type(model),
        "architecture": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }


def read_base_model_record(directory: str | Path) -> dict[str, str | None]:
    """The base-model record of a Meta-KV directory (empty for a directory saved without one)."""
    record = read_json(Path(directory) / CONFIG_FILE, "Meta-KV config")
    return dict(record.get("base_model") or {}) if isinstance(record, dict) and "meta_kv" in record else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(directory: Path, model: nn.Module) -> MetaKVConfig:
    """The saved MetaKVConfig, once the weights' checksum and the base model type are verified."""
    path = directory / CONFIG_FILE
    record = read_json(path, "Meta-KV config")
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    if "meta_kv" not in record:
        warnings.warn(f"{path} records no weights checksum or base model (saved by an older metakv-cl); "
                      "loading it unverified; save it again to record them", stacklevel=3)
        return MetaKVConfig.from_dict(record)
    unknown = sorted(set(record) - {"meta_kv", "base_model", "weights_sha256"})
    if unknown or not isinstance(record["meta_kv"], dict):
        raise ValueError(
            f"{path}: unexpected layout (keys {sorted(record)}); expected meta_kv, base_model, weights_sha256"
        )
    base = record.get("base_model") or {}
    saved_type, saved_architecture = base.get("model_type"), base.get("architecture")
    if saved_type is not None and saved_type != _model_type(model):
        raise ValueError(f"{directory}: Meta-KV weights of a {saved_type!r} model cannot load into a "
                         f"{_model_type(model)!r} model; load them into a {saved_type!r} base model")
    if saved_architecture is not None and saved_architecture != type(model).__name__:
        raise ValueError(f"{directory}: Meta-KV weights of a {saved_architecture} cannot load into a "
                         f"{type(model).__name__}; load them into a {saved_architecture}")
    actual = _sha256(directory / WEIGHTS_FILE)
    if actual != record.get("weights_sha256"):
        raise ValueError(f"{directory / WEIGHTS_FILE}: sha256 {actual[:16]}... differs from the "
                         f"{str(record.get('weights_sha256'))[:16]}... recorded in {CONFIG_FILE}: "
                         "the file was changed or damaged after saving")
    return MetaKVConfig.from_dict(record["meta_kv"])


def load_meta_kv(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load Meta-KV parameters saved by :func:`save_meta_kv` into ``model``.

    Adds Meta-KV with the saved config if the model has none.

    Raises:
        FileNotFoundError: a file is missing. ValueError: the weights file does not match its
            recorded checksum, the saved base model type differs from ``model``'s, or the saved
            config differs from the model's Meta-KV config.
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no Meta-KV checkpoint in {directory}: {name} is missing")
    config = _read_record(directory, model)
    if not has_meta_kv(model):
        add_meta_kv(model, config)
    meta_kv = get_meta_kv(model)
    if meta_kv.config != config:
        raise ValueError(f"saved Meta-KV config {config} differs from the model's {meta_kv.config}")
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(next(meta_kv.parameters()).device))
    except Exception as error:  # safetensors' errors do not name the file
        raise ValueError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({error})") from None
    was_merged = meta_kv.merged
    if was_merged:
        meta_kv.set_merged(False)
    try:
        meta_kv.load_state_dict(state)
    except RuntimeError as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{directory / WEIGHTS_FILE}: parameters do not fit this model: {reason}") from None
    finally:
        if was_merged:
            meta_kv.set_merged(True)
    return model
