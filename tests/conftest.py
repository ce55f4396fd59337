"""Shared fixtures: tiny randomly initialised GPT-2 and Llama-family models."""

import pytest
import torch

from metakv_cl.testing import tiny_gpt2, tiny_llama

TINY_MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture
def cli_error(capsys):
    """Run ``metakv_cl.cli.main(argv)`` expecting a failure; return its one error line.

    Checks the CLI's error contract: a non-zero exit, exactly one ``metakv-cl: error:`` line on
    stderr and no traceback.
    """
    from metakv_cl.cli import main

    def run(argv) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code not in (0, None), err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("metakv-cl: error:")]
        assert len(lines) == 1, err
        return lines[0]

    return run


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model_factory(request):
    """A factory for each tiny architecture (GPT-2, Llama)."""
    torch.manual_seed(0)
    return TINY_MODELS[request.param]


def pytest_configure(config):
    # No test may wait on the Hugging Face hub: offline fallbacks are what is tested.
    import os
    import tempfile

    from metakv_cl import _compat

    # pytest drops warning filters added while it collects (where `import metakv_cl` runs), and
    # the dependencies now load later, inside tests: keep their notices out of the summary here.
    _compat.silence_dependency_notices()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The offline SmolLM2 is converted once for the session, into a folder removed at its end
    # (not into the user's ~/.cache).
    os.environ["METAKV_CL_CACHE"] = config._metakv_cache = tempfile.mkdtemp(prefix="metakv-cl-test-cache-")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(getattr(config, "_metakv_cache", ""), ignore_errors=True)


class PlantedPickle:
    """What a planted file could hold: unpickling it creates ``marker`` (a harmless stand-in for
    running a shell command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def planted(tmp_path):
    """(payload, marker): an object whose unpickling creates the file ``marker``."""
    marker = tmp_path / "pwned"
    return PlantedPickle(marker), marker
