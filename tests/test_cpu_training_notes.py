"""The CLI's notes on CPU settings that slow training several-fold (busy cores, emulated bf16)."""

import os

import pytest
import torch

from metakv_cl import lightning_cli
from metakv_cl.lightning_cli import cpu_training_notes


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core CPU without bf16 instructions, running 2 torch threads; the test sets the load."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(lightning_cli, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return lambda load: monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


def test_threads_beyond_the_idle_cores_and_emulated_bf16_are_named(two_cores):
    two_cores(3.0)
    notes = cpu_training_notes({"accelerator": "cpu", "precision": "bf16-mixed"})
    assert len(notes) == 2
    assert notes[0].startswith("precision bf16-mixed on a CPU without bf16 instructions")
    assert notes[1].startswith("2 torch threads on 2 cores with a load average of 3.0") and "torch_num_threads" in notes[1]


def test_an_idle_machine_at_full_precision_and_a_gpu_run_get_no_note(two_cores):
    two_cores(0.2)
    assert cpu_training_notes({"accelerator": "auto", "precision": "32-true"}) == []
    two_cores(3.0)
    assert cpu_training_notes({"accelerator": "gpu", "precision": "bf16-mixed"}) == []
