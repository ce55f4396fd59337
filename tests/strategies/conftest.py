import pytest

from metakv_cl.training.testing import single_torch_thread


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield
