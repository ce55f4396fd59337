"""The task loaders a config may name.

``data.loader`` / ``data.warmup_loader`` of a config (and :class:`~metakv_cl.data.stream.TaskStream`)
name a loader from this registry, never an arbitrary Python callable: a config file is data
and must not be able to run ``os.system`` or ``builtins.eval``. A loader is named by its
registered name (``synthetic_topic_tasks``) or by a dotted path to it
(``metakv_cl.data.synthetic.synthetic_topic_tasks``, which older configs use); a dotted path
is only looked up in modules already imported, never imported.

Your own loader is any function returning a list of tasks, registered in one of two ways:

* in Python, before the stream is built::

      from metakv_cl.data import register_loader

      @register_loader                     # or @register_loader(name="my_tasks")
      def my_tasks(root: str, seed: int = 0) -> list[TextTask]: ...

* for the ``metakv-cl`` command line, as an entry point of your installed package (installing
  a package is the trust decision; a config alone never imports anything)::

      [project.entry-points."metakv_cl.loaders"]
      my_tasks = "my_package.tasks:my_tasks"

Either way the config then says ``loader: my_tasks`` (or the function's dotted path).
"""

from __future__ import annotations

import functools
import sys
from importlib.metadata import entry_points
from typing import Callable, TypeVar

ENTRY_POINT_GROUP = "metakv_cl.loaders"

Loader = TypeVar("Loader", bound=Callable)

_LOADERS: dict[str, Callable] = {}


def register_loader(function: Loader | None = None, *, name: str | None = None):
    """Register a task loader (a function returning a list of tasks) under ``name``.

    Usable as ``@register_loader`` or ``@register_loader(name="...")``. The function can then
    be named in a config by ``name`` (default: the function's own name) or by its dotted path.

    Raises:
        ValueError: ``name`` is taken by another function, or is not a plain identifier.
    """
    def register(loader: Loader) -> Loader:
        key = name or loader.__name__
        if not key.isidentifier():
            raise ValueError(f"register_loader: name {key!r} must be a plain identifier (letters, digits, _)")
        if _LOADERS.get(key, loader) is not loader:
            taken = _LOADERS[key]
            raise ValueError(f"register_loader: the name {key!r} is taken by {taken.__module__}.{taken.__qualname__}")
        _LOADERS[key] = loader
        return loader

    return register if function is None else register(function)


def registered_loaders() -> list[str]:
    """The names a config may give as ``loader``, sorted."""
    _load_entry_points()
    return sorted(_LOADERS)


def get_loader(name: str, key: str = "loader") -> Callable:
    """The registered loader ``name`` (a registered name or its dotted path).

    Args:
        name: what the config says.
        key: the config key, for the error message.

    Raises:
        ValueError: ``name`` is not registered (the message lists what is).
    """
    if not isinstance(name, str):
        raise ValueError(f"{key}: expected a loader name, got {type(name).__name__} {name!r}")
    for attempt in range(2):
        found = _LOADERS.get(name) or _registered_at(name)
        if found is not None:
            return found
        if attempt == 0:
            _load_entry_points()
    raise ValueError(
        f"{key}: {name!r} is not a registered task loader; registered: {', '.join(sorted(_LOADERS))} "
        "(register your own with metakv_cl.data.register_loader or a 'metakv_cl.loaders' entry point)"
    )


def _registered_at(dotted_path: str) -> Callable | None:
    """The registered loader that ``module.name`` refers to, looked up in modules already
    imported (registering a loader imported its module); nothing is imported or called."""
    module_name, _, attribute = dotted_path.rpartition(".")
    module = sys.modules.get(module_name)
    candidate = vars(module).get(attribute) if module is not None else None
    return candidate if any(candidate is loader for loader in _LOADERS.values()) else None


@functools.cache
def _load_entry_points() -> None:
    """Register the loaders installed packages declare (once per process)."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loader = entry.load()
        except Exception as error:  # a broken plugin's error would not say which plugin it is
            raise ValueError(
                f"the {ENTRY_POINT_GROUP} entry point {entry.name!r} ({entry.value}) cannot load: "
                f"{type(error).__name__}: {error}"
            ) from error
        register_loader(loader, name=entry.name)
