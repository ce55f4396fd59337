"""Compaction methods by name: ``get_method("attention_matching", selection="omp")``."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from metakv_cl.kv.protocol import KVCompressor

_FACTORIES: dict[str, tuple[Callable[..., KVCompressor], dict[str, Any]]] = {}


def register_method(name: str, **defaults: Any) -> Callable[[type], type]:
    """Class decorator: make a method available as ``name`` (``defaults`` preset constructor arguments).

    Raises:
        ValueError: if the name is already taken.
    """

    def decorate(cls: type) -> type:
        if name in _FACTORIES:
            raise ValueError(f"a compaction method named {name!r} is already registered")
        _FACTORIES[name] = (cls, defaults)
        return cls

    return decorate


def _load_builtin_methods() -> None:
    importlib.import_module("metakv_cl.kv.methods")


def available_methods() -> tuple[str, ...]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return tuple(sorted(_FACTORIES))


def get_method(name: str, **kwargs: Any) -> KVCompressor:
    """Build the method registered as ``name``.

    Args:
        name: a registered name (see :func:`available_methods`).
        **kwargs: constructor arguments (override the registered defaults).

    Returns:
        The method instance.

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad arguments.
    """
    _load_builtin_methods()
    if name not in _FACTORIES:
        raise ValueError(f"unknown KV compaction method {name!r}; known methods: {', '.join(sorted(_FACTORIES))}")
    factory, defaults = _FACTORIES[name]
    try:
        return factory(**{**defaults, **kwargs})
    except TypeError as error:
        raise ValueError(f"bad arguments for KV compaction method {name!r}: {error}") from None
