"""The torchvision-on-CPU-torch import fix, offline loading, and silenced dependency notices."""

import subprocess
import sys
import warnings

import pytest
import torch

from metakv_cl import _compat


def test_stack_imports_after_metakv_cl():
    code = "import metakv_cl, torchvision, avalanche, peft; from transformers import GPT2LMHeadModel; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_fix_is_a_no_op_when_the_extension_loads(monkeypatch):
    """On a working install (CPU or CUDA) the extension loads and nothing is declared."""
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(_compat, "_declared_library", None)
    monkeypatch.setattr(_compat, "_torchvision_extension_path", lambda: "/fake/_C.so")
    loaded = []
    assert _compat.ensure_torchvision_ops(load_extension=loaded.append) is False
    assert loaded == ["/fake/_C.so"]
    assert _compat._declared_library is None


def test_fix_is_a_no_op_without_torchvision(monkeypatch):
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(_compat, "_declared_library", None)
    monkeypatch.setattr(_compat, "_torchvision_extension_path", lambda: None)
    assert _compat.ensure_torchvision_ops() is False


def test_fix_declares_the_schemas_exactly_when_the_extension_fails():
    """In a fresh interpreter both ops exist after ``import metakv_cl, torchvision``, and they were
    declared by the fix if and only if torchvision's own extension cannot load."""
    probe = (
        "import torch, metakv_cl, torchvision\n"
        "from metakv_cl import _compat\n"
        "ops = all(hasattr(torch.ops.torchvision, name) for name in ('nms', 'qnms'))\n"
        "print(_compat._declared_library is not None, ops)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    declared, ops_exist = result.stdout.split()
    assert ops_exist == "True"
    load = "import torch; from metakv_cl._compat import _torchvision_extension_path as path; torch.ops.load_library(path())"
    extension_loads = subprocess.run([sys.executable, "-c", load], capture_output=True, timeout=300).returncode == 0
    assert (declared == "True") == (not extension_loads)


def test_declared_ops_fail_clearly_when_called():
    pytest.importorskip("torchvision")
    import torchvision  # noqa: F401

    if _compat._declared_library is None:
        pytest.skip("torchvision's own extension is loaded here")
    with pytest.raises(NotImplementedError):
        torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def test_importing_metakv_cl_leaves_torch_and_torchvision_unloaded():
    """The fix waits for torchvision's import, so the command line's --help does not load torch."""
    code = "import sys, metakv_cl; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_help_and_the_stack_import_print_no_dependency_notice():
    """A warning on screen must mean something: the QP-solver notice of Avalanche's GEM import is gone."""
    code = "import metakv_cl.strategies; from metakv_cl.cli import main; main(['--help'])"
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: metakv-cl" in result.stdout
    assert "QP solver" not in result.stderr, result.stderr


def test_dependency_notices_are_silenced_only_for_their_own_module():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        _compat.silence_dependency_notices()
        warnings.warn_explicit("no QP solver found on your system", UserWarning, "solvers.py", 1, module="qpsolvers.solvers")
        warnings.warn_explicit("no QP solver found on your system", UserWarning, "mine.py", 1, module="my_project")
    assert [str(w.message) for w in caught] == ["no QP solver found on your system"]
    assert caught[0].filename == "mine.py"
