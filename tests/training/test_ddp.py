"""DDP with two CPU processes (gloo) trains the stream and agrees with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metakv_cl.cli import main
from metakv_cl.strategies import EWC, plugins
from metakv_cl.training.testing import toy_config, toy_setup, toy_trainer_kwargs

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the gloo tests run on Linux CI")


def method_result(root) -> dict:
    return json.loads((root / "report.json").read_text())["methods"][0]


def fit_two_processes_and_one(tmp_path, config: dict) -> tuple[dict, dict]:
    """The reported results (R matrix, extra) of ``metakv-cl fit`` with DDP on two CPU processes
    and in one process (whose mini-batch is twice the per-rank one, so both take the same
    optimizer steps)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    ddp_root = tmp_path / "ddp"
    command = [sys.executable, "-m", "metakv_cl.cli", "fit", "--config", str(path),
               "--trainer.default_root_dir", str(ddp_root), "--trainer.strategy", "ddp", "--trainer.devices", "2"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in completed.stdout + completed.stderr
    single_root = tmp_path / "single"
    per_rank = config["strategy"]["init_args"]["train_mb_size"]
    main(["fit", "--config", str(path), "--trainer.default_root_dir", str(single_root),
          "--strategy.init_args.train_mb_size", str(2 * per_rank)])
    return method_result(ddp_root), method_result(single_root)


@needs_linux
@pytest.mark.parametrize("pack_length", [None, 32], ids=["padded", "packed"])
def test_two_process_ddp_matches_one_process(tmp_path, pack_length):
    # replay exercises the buffer (its sampling must agree across ranks); no dropout, so that
    # two ranks with batches of 4 take exactly the steps of one process with batches of 8
    # (packed: each rank packs its own 4 documents, the single process its 8)
    config = toy_config(tmp_path / "unused", strategy={
        "class_path": "metakv_cl.strategies.Replay",
        "init_args": {"buffer_size": 8, "train_mb_size": 4, "eval_mb_size": 4, "train_pack_length": pack_length},
    })
    config["model"]["init_args"]["config_overrides"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    distributed_result, single_result = fit_two_processes_and_one(tmp_path, config)
    distributed, single = distributed_result["matrix"], single_result["matrix"]
    assert len(distributed) == 3
    for row_ddp, row_single in zip(distributed, single):
        assert row_ddp == pytest.approx(row_single, rel=1e-5)
    assert distributed[2][1] < distributed[0][1] - 0.1  # it did train
    # per-item outcomes gathered from both ranks in test-set order
    assert distributed_result["items"]["tokens"] == single_result["items"]["tokens"]
    for row_ddp, row_single in zip(distributed_result["items"]["nll"], single_result["items"]["nll"]):
        for task_ddp, task_single in zip(row_ddp, row_single):
            assert task_ddp == pytest.approx(task_single, rel=1e-4, abs=2e-4)
    # throughput counts both ranks' tokens (each rank trained on half of them)
    assert distributed_result["extra"]["train_tokens"] == single_result["extra"]["train_tokens"] > 0


@needs_linux
def test_validated_meta_kv_consolidation_under_ddp_matches_one_process(tmp_path):
    """Consolidation fits, its held-out validation and early stopping run on both ranks in step
    (a rank-local stopping decision would hang the other rank), and give one process's result."""
    config = toy_config(tmp_path / "unused", strategy={
        "class_path": "metakv_cl.strategies.MetaKVConsolidation",
        "init_args": {"mode": "replay", "buffer_size": 8, "train_mb_size": 4, "eval_mb_size": 4,
                      "consolidation_epochs": 3, "validation_fraction": 0.25, "patience": 1},
    })
    model = config["model"]["init_args"]
    model["config_overrides"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model["meta_kv"] = {"source": "consolidated", "rank": 4}
    distributed, single = (result["matrix"] for result in fit_two_processes_and_one(tmp_path, config))
    assert len(distributed) == 3
    for row_ddp, row_single in zip(distributed, single):
        assert row_ddp == pytest.approx(row_single, rel=1e-4)


def toy_fisher(root: Path) -> dict[str, torch.Tensor]:
    """EWC's Fisher of the toy model on the first experience, one item per batch."""
    torch.manual_seed(0)
    benchmark, module = toy_setup(2)
    strategy = EWC(module=module, trainer_kwargs=toy_trainer_kwargs(root, enable_checkpointing=False), train_mb_size=1)
    return strategy.plugin(plugins.EWC).estimate_fisher(strategy, benchmark.train_stream[0].dataset)


def fisher_on_rank(rank: int, world: int, root: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        torch.save(toy_fisher(Path(root)), Path(root) / f"fisher_rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@needs_linux
def test_ewc_fisher_is_summed_over_every_rank(tmp_path):
    """Each rank sees half the items; with one item per batch the sharding cannot change the mean
    squared gradient, so both ranks must hold exactly one process's Fisher over all items."""
    torch.multiprocessing.spawn(fisher_on_rank, args=(2, str(tmp_path)), nprocs=2)
    single = toy_fisher(tmp_path)
    for rank in range(2):
        fisher = torch.load(tmp_path / f"fisher_rank{rank}.pt")
        assert fisher.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-12)
