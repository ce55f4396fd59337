"""The names of transformers' cache argument, on both sides of its rename.

transformers 5.24 renamed the cache argument of models, decoder layers and attention modules
from ``past_key_values`` to ``cache`` (and the output field likewise); model forwards and
``generate`` still take the old keyword, with a FutureWarning, until its removal. Code that
passes or reads the cache by name goes through these helpers, which ask the function's own
signature, so it works on every supported release (``pyproject.toml`` declares the range)
and never silently reads ``None`` where a cache was passed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from transformers import Cache

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")  # the current name first


def cache_argument_name(function: Callable) -> str:
    """The name under which ``function`` (a model's or module's ``forward``, or ``generate``) takes the cache.

    Raises:
        TypeError: if the signature names neither known argument (a transformers release
            outside the supported range, or a model that takes no cache).
    """
    parameters = inspect.signature(function).parameters
    for name in CACHE_ARGUMENT_NAMES:
        if name in parameters:
            return name
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return _installed_cache_name()
    raise TypeError(
        f"{getattr(function, '__qualname__', function)!r} takes no cache argument (looked for "
        f"{' or '.join(CACHE_ARGUMENT_NAMES)}): this transformers release is outside the supported range"
    )


@functools.cache
def _installed_cache_name() -> str:
    """The cache keyword that the installed transformers' own causal-LM forwards declare."""
    from transformers import GPT2Model

    return "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def with_cache(model: Callable, cache) -> dict[str, Any]:
    """Keyword arguments that pass ``cache`` to ``model(...)`` or ``model.generate(...)`` under its current name.

    Args:
        model: a model (its ``forward`` is asked) or any callable that forwards to one.
        cache: the cache to pass.
    """
    return {cache_argument_name(getattr(model, "forward", model)): cache}


def passed_cache(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]):
    """The cache passed to one call of a function with ``signature`` (a forward pre-hook's view), or None.

    Either name is read, since a caller may still use the old keyword on a release that renamed
    it. A :class:`~transformers.Cache` that arrives under any other name raises instead of reading
    as None: a reader that misses the cache would silently treat every decoding step as a new
    sequence. Binding the signature (slow on this hot path) happens only for positional calls.

    Raises:
        TypeError: a Cache was passed under an argument name that is not a known cache name.
    """
    for name in CACHE_ARGUMENT_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    named = signature.bind_partial(*args, **kwargs).arguments if len(args) > 1 else kwargs
    for name in CACHE_ARGUMENT_NAMES:
        if named.get(name) is not None:
            return named[name]
    stray = sorted({name for name, value in [*named.items(), *kwargs.items()] if isinstance(value, Cache)})
    if stray:
        raise TypeError(
            f"a transformers Cache arrived as {', '.join(stray)}, not as {' or '.join(CACHE_ARGUMENT_NAMES)}: "
            "this transformers release is outside the supported range (pyproject.toml) and would lose the cache"
        )
    return None


def output_cache(output):
    """The cache returned in a model output (``output.cache`` or, before 5.24, ``output.past_key_values``)."""
    for name in CACHE_ARGUMENT_NAMES:
        if name in getattr(output, "__dataclass_fields__", {}):
            return getattr(output, name)
    raise TypeError(f"{type(output).__name__} has no cache field ({' or '.join(CACHE_ARGUMENT_NAMES)})")
