"""DDP with two CPU processes (gloo) trains the stream and agrees with one process."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from metakv_cl.cli import main
from metakv_cl.training.testing import toy_config


def matrix(root):
    return json.loads((root / "report.json").read_text())["methods"][0]["matrix"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the gloo test runs on Linux CI")
def test_two_process_ddp_matches_one_process(tmp_path):
    # replay exercises the buffer (its sampling must agree across ranks); no dropout, so that
    # two ranks with batches of 4 take exactly the steps of one process with batches of 8
    config = toy_config(tmp_path / "unused", strategy={
        "class_path": "metakv_cl.strategies.Replay",
        "init_args": {"buffer_size": 8, "train_mb_size": 4, "eval_mb_size": 4},
    })
    config["model"]["init_args"]["config_overrides"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
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
    main(["fit", "--config", str(path), "--trainer.default_root_dir", str(single_root),
          "--strategy.init_args.train_mb_size", "8"])

    distributed, single = matrix(ddp_root), matrix(single_root)
    assert len(distributed) == 3
    for row_ddp, row_single in zip(distributed, single):
        assert row_ddp == pytest.approx(row_single, rel=1e-5)
    assert distributed[2][1] < distributed[0][1] - 0.1  # it did train
