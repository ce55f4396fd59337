"""Import-time fixes for the environments this project runs in.

Two of them:

PyPI's only torchvision that matches some CPU-only torch builds is a CUDA build. Its C
extension then fails to load, and ``import torchvision`` dies in
``torchvision/_meta_registrations.py`` with ``operator torchvision::nms does not exist``,
because that module registers fake kernels for the two NMS ops without checking that the
ops were defined. Avalanche, peft and transformers' model classes all import torchvision,
so that one failure takes the whole stack down.

:func:`ensure_torchvision_ops` declares the two missing op schemas (``nms`` and ``qnms``,
the signatures torchvision's C++ code defines) before torchvision is imported, and only
when its extension cannot be loaded. On a working install (CPU or CUDA) the extension
loads and nothing is declared. The ops stay unimplemented: calling them raises
``NotImplementedError`` from the dispatcher instead of crashing every import.
:func:`fix_torchvision_on_import` runs it at the moment torchvision is first imported, so that
``import metakv_cl`` (and so ``metakv-cl --help``) does not pay for importing torch.

:func:`silence_dependency_notices` filters the warnings that dependencies print on every run
and that no user of this project can act on, so that a warning on screen means something.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# (message regex, module regex) of notices that dependencies raise on every run:
# - Avalanche imports its GEM plugin, whose qpsolvers import warns when no QP solver is
#   installed; only GEM solves QPs, and no strategy of this project uses it.
# - Lightning's pytree helpers still construct torch's deprecated LeafSpec on every batch.
DEPENDENCY_NOTICES = (
    ("no QP solver found", r"qpsolvers(\..*)?"),
    (r".*isinstance\(treespec, LeafSpec\).*", ""),
)

# The schemas torchvision's csrc/ops/nms.cpp and quantized qnms define.
TORCHVISION_NMS_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# Keeps the Library (and so the op definitions) alive for the life of the process.
_declared_library: torch.library.Library | None = None


def _torchvision_extension_path() -> str | None:
    """The path of torchvision's compiled ``_C`` extension, or None if not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd")))
        if found:
            return found[0]
    return None


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision_ops(load_extension=None) -> bool:
    """Declare ``torchvision::nms`` and ``torchvision::qnms`` if torchvision's extension cannot load.

    Args:
        load_extension: callable taking the extension path and raising ``OSError`` or
            ``ImportError`` on failure; defaults to ``torch.ops.load_library`` (what
            torchvision itself calls). Tests pass a stand-in.

    Returns:
        True if the schemas were declared by this call, False if nothing had to be done
        (torchvision absent or already imported, extension loads, or ops already defined).
    """
    global _declared_library
    if "torchvision" in sys.modules or _declared_library is not None:
        return False
    path = _torchvision_extension_path()
    if path is None:
        return False
    import torch

    load_extension = load_extension or torch.ops.load_library
    try:
        load_extension(path)
        return False
    except (OSError, ImportError, RuntimeError):
        pass
    missing = [schema for schema in TORCHVISION_NMS_SCHEMAS if not _op_exists(schema.split("(")[0])]
    if not missing:
        return False
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        library.define(schema)
    _declared_library = library
    return True


class _TorchvisionImportFix(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_ops` just before the first ``import torchvision``, then leaves."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            ensure_torchvision_ops()
        return None  # the regular finders import torchvision


def fix_torchvision_on_import() -> None:
    """Apply :func:`ensure_torchvision_ops` when torchvision is first imported in this process."""
    if "torchvision" in sys.modules:
        return  # imported before metakv_cl: too late to help, as an eager fix would be
    if not any(isinstance(finder, _TorchvisionImportFix) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportFix())


def silence_dependency_notices() -> None:
    """Ignore :data:`DEPENDENCY_NOTICES` (each matched by message and issuing module only)."""
    for message, module in DEPENDENCY_NOTICES:
        warnings.filterwarnings("ignore", message=message, module=module)
