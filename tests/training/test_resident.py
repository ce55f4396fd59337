"""The resident single-device strategy, and stream runs that keep only their results."""

import json

import pytorch_lightning as pl
import pytest

from metakv_cl.strategies import EWC, LoRA
from metakv_cl.training import RESIDENT_STRATEGY_NAME, ContinualLMModule, ResidentSingleDeviceStrategy
from metakv_cl.training.runner import run_stream
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs


@pytest.fixture
def cpu_moves(monkeypatch):
    """Counts ContinualLMModule.cpu() calls (what Lightning's teardown does after every fit)."""
    calls = []
    original = ContinualLMModule.cpu

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(ContinualLMModule, "cpu", counting)
    return calls


@pytest.mark.parametrize("strategy, moves", [("auto", True), (RESIDENT_STRATEGY_NAME, False)])
def test_resident_strategy_leaves_the_module_on_its_device(tmp_path, cpu_moves, strategy, moves):
    benchmark, module = toy_setup(2)
    kwargs = toy_trainer_kwargs(tmp_path, enable_checkpointing=False, strategy=strategy)
    cl_strategy = EWC(module=module, trainer_kwargs=kwargs, train_mb_size=8)  # fits, validations and a Fisher pass
    result = run_stream(cl_strategy, benchmark, root_dir=tmp_path / "run")
    assert bool(cpu_moves) == moves
    assert len(result.matrix) == 3 and result.summary["forgetting"] is not None


def test_resident_strategy_is_registered_and_resolves_its_device():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=RESIDENT_STRATEGY_NAME, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(trainer.strategy, ResidentSingleDeviceStrategy)
    assert trainer.strategy.root_device.type == "cpu"


def test_run_without_weights_keeps_results_and_facts(tmp_path):
    benchmark, module = toy_setup(2)
    strategy = LoRA(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path, enable_checkpointing=False),
                    train_mb_size=8, rank=2)
    result = run_stream(strategy, benchmark, root_dir=tmp_path / "run", save_weights=False)
    state = tmp_path / "run" / "stream_state"
    assert not (state / "state.safetensors").exists()
    written = json.loads((state / "result.json").read_text())
    assert written["matrix"] == result.matrix
    assert json.loads((state / "progress.json").read_text())["next_experience"] == 2
    facts = result.extra
    assert facts["device"] == "cpu" and facts["peak_memory_bytes"] > 0 and facts["wall_time_s"] > 0
    assert 0 < facts["trainable_params"] < sum(p.numel() for p in module.parameters())
