"""What keeps a run folder safe to share, to resume and to run in: no code runs on load, names
stay inside it, one live run at a time, files are replaced whole, settings cannot drift.

Run folders are passed around like data, so nothing read from one may execute code: states
are a safetensors file (tensors) whose header holds everything else as JSON
(:func:`save_state_file` / :func:`load_state_file`), and Lightning checkpoints are read with
``torch.load(weights_only=True)`` and an explicit allow-list (:func:`load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

# Names that become folders: one path component made of these characters.
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]+")
SAFE_NAME_RULE = "letters, digits, '.', '_', '+' and '-' (one folder name: no '/', not '.' or '..')"


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (busy, unreadable, or written with other settings)."""


def check_folder_name(value: Any, what: str) -> str:
    """Return ``value`` if it is a plain folder name, else raise naming ``what`` and the rule.

    Raises:
        ValueError: ``value`` is not a string of :data:`SAFE_NAME_RULE`.
    """
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} cannot be a folder name: use {SAFE_NAME_RULE}")
    return value


def remove_tree(path: str | Path, root: str | Path) -> None:
    """``shutil.rmtree(path)`` (missing is fine), refused unless ``path`` lies inside ``root``."""
    path, root = Path(path).resolve(), Path(root).resolve()
    if path == root or root not in path.parents:
        raise ValueError(f"refusing to delete {path}: it is not inside the run folder {root}")
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)`` on a uniquely named file beside ``path``, then move it over ``path``.

    A reader never sees a half-written file, and two writers never share a temporary file. The
    writer creates the file, so it gets the usual permissions (``mkstemp`` would make it private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


# ---------------------------------------------------------------------------- state files

_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS, _ARRAY}
_STATE_KEY = "state"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu()
        return {_TENSOR: key}
    if isinstance(value, np.ndarray):
        return {_ARRAY: [value.dtype.str, list(value.shape), value.ravel().tolist()]}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_encode(item, tensors, f"{where}[{index}]") for index, item in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not _MARKERS & set(value):
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {_ITEMS: [[_encode(key, tensors, where), _encode(item, tensors, f"{where}[{key!r}]")]
                         for key, item in value.items()]}
    raise TypeError(
        f"{where} is a {type(value).__name__}: a state file holds only tensors, numbers, strings, "
        "lists, tuples and dicts of them"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_decode(item, tensors) for item in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {_hashable(_decode(key, tensors)): _decode(item, tensors) for key, item in value[_ITEMS]}
    if set(value) == {_ARRAY}:
        dtype, shape, data = value[_ARRAY]
        return np.array(data, dtype=np.dtype(dtype)).reshape(shape)
    return {key: _decode(item, tensors) for key, item in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(part) for part in key) if isinstance(key, (list, tuple)) else key


def save_state_file(obj: Any, path: str | Path) -> None:
    """Write ``obj`` (nested dicts/lists/tuples of tensors and plain values) atomically as one
    safetensors file: the tensors as tensors, the rest as JSON in the header.

    Raises:
        TypeError: ``obj`` holds something else (named by its position, e.g. ``state.strategy.memory``).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    document = json.dumps(_encode(obj, tensors, "state"))
    stored, seen = {}, set()
    for key, tensor in tensors.items():
        # safetensors wants every tensor contiguous and in its own storage (tied weights share one)
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        stored[key] = tensor.clone() if pointer in seen else tensor.contiguous()
        if pointer is not None:
            seen.add(pointer)
    atomic_write(path, lambda temporary: save_file(stored, str(temporary), metadata={_STATE_KEY: document}))


def load_state_file(path: str | Path) -> Any:
    """Read a :func:`save_state_file` file (no code runs).

    Raises:
        RunFolderError: the file is missing, truncated, corrupt or not a state file.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return _decode(json.loads(metadata[_STATE_KEY]), tensors)
    except Exception as error:  # OSError, safetensors' own error, a header without our JSON or not matching its tensors
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunFolderError(f"{path} is not a readable state file ({reason}); was it truncated or replaced?") from None


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def settings_key(settings: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> str:
    """A short hash of JSON ``settings`` (and of ``tensors``' names, shapes and values)."""
    payload = json.dumps(settings, sort_keys=True, default=repr) + (_tensor_digest(tensors) if tensors else "")
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- checkpoints


def _safe_checkpoint_globals() -> list:
    from metakv_cl.modeling.config import MetaKVConfig

    return [MetaKVConfig]  # the module's saved hyper-parameters hold its Meta-KV config


@contextlib.contextmanager
def safe_checkpoint_loading() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` accept the plain classes our checkpoints hold."""
    with torch.serialization.safe_globals(_safe_checkpoint_globals()):
        yield


class UnsafeCheckpointError(RunFolderError):
    """A checkpoint holds Python objects that loading would have to construct (it could run code)."""


class DamagedCheckpointError(RunFolderError):
    """A checkpoint's bytes are not a whole checkpoint (truncated by a full disk or a kill mid-write)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint without running code from it.

    The file is memory-mapped, so checking a large checkpoint before a resume does not hold a
    second copy of it in memory.

    Raises:
        UnsafeCheckpointError: it holds objects outside tensors, plain values and the allow-list.
        DamagedCheckpointError: its bytes are not a whole checkpoint (truncated or corrupt).
        OSError: it cannot be read at all (missing, permissions, I/O): not a damaged file, so
            nothing may treat it as one and overwrite it.
    """
    path = Path(path)
    try:
        with safe_checkpoint_loading():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError:
        raise
    except pickle.UnpicklingError as error:
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(error))
        raise UnsafeCheckpointError(
            f"{path} was refused: it holds Python objects that loading would run "
            f"({found.group(1) if found else 'not tensors or plain values'}); only tensors and plain values are loaded"
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:  # zip, EOF and storage errors of damaged bytes
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedCheckpointError(f"{path} is unreadable ({reason})") from None


# ---------------------------------------------------------------------------- lock


@contextlib.contextmanager
def run_lock(root: str | Path) -> Iterator[None]:
    """Hold ``<root>/.lock`` for the block; a second live run in ``root`` is refused.

    The lock is an ``flock`` on an open file: the system drops it when the holding process
    ends, however it ends, so a killed run never leaves a stale lock behind.

    Raises:
        RunFolderError: another live process holds the lock.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderError(
                f"{root} is in use by another live run (pid {holder}); wait for it to end or use another "
                "default_root_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- settings fingerprint

FINGERPRINT_FILE = "settings.json"


def flatten_keys(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of nested dicts and lists (list items as ``key[i]``)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten_keys(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(value, (list, tuple)) and value:
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten_keys(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: value}


def _same(a: Any, b: Any) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b


def check_settings(root: str | Path, settings: dict[str, Any], resume: bool, record: bool = True) -> None:
    """On ``resume``, refuse ``settings`` (what changes results) that differ from those recorded in
    ``<root>/settings.json``; then, if ``record``, record them there (creating ``root``).

    Raises:
        RunFolderError: resuming with different settings (the differing keys are named).
    """
    path = Path(root) / FINGERPRINT_FILE
    settings = json.loads(json.dumps(settings, default=str))  # compare what a reload would read
    if resume and path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RunFolderError(f"{path} is unreadable ({error}); the run's settings cannot be checked") from None
        old, new = flatten_keys(recorded), flatten_keys(settings)
        differing = sorted(key for key in old.keys() | new.keys() if not _same(old.get(key), new.get(key)))
        if differing:
            shown = "; ".join(
                f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}" for key in differing[:8]
            )
            more = f" (and {len(differing) - 8} more)" if len(differing) > 8 else ""
            raise RunFolderError(
                f"--ckpt_path last: {root} was run with other settings ({shown}{more}); resume with the "
                "original settings or use a new default_root_dir"
            )
    if record:
        atomic_write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", path)
