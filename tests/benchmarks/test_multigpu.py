"""benchmarks/multigpu.py: the GPU config's fit configs, and a gloo run of two CPU processes against one."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.multigpu import DEFAULT_CONFIG, fit_config, main


CPU_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "benchmarks" / "multigpu_cpu.yaml"


def test_fit_config_splits_the_global_batch_and_names_problems(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())  # the GPU config
    fit = fit_config(config, "ewc", 2, 5, None, tmp_path / "root")
    assert fit["strategy"]["init_args"]["train_mb_size"] == 8 and fit["model"]["init_args"]["lr"] == 1e-4
    assert (fit["trainer"]["devices"], fit["trainer"]["strategy"], fit["seed_everything"]) == (2, "ddp", 5)
    assert fit_config(config, "metakv-replay-validated", 4, 0, None, tmp_path)["strategy"]["init_args"]["train_mb_size"] == 4
    with pytest.raises(ValueError, match="unknown run 'lwf'"):
        fit_config(config, "lwf", 1, 0, None, tmp_path)
    with pytest.raises(ValueError, match="does not split over 3 devices"):
        fit_config(config, "ewc", 3, 0, None, tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the gloo test runs on Linux CI")
def test_two_cpu_processes_agree_with_one_and_the_report_is_written(tmp_path):
    out = tmp_path / "out"
    assert main(["--config", str(CPU_CONFIG), "--runs", "ewc", "--devices", "1", "2", "--out-dir", str(out)]) == 0
    rows = json.loads((out / "multigpu.json").read_text())["rows"]
    assert [(row["run"], row["devices"]) for row in rows] == [("ewc", 1), ("ewc", 2)]
    two = rows[1]
    # EWC's Fisher batches differ in DDP (4 items a rank against 8), so not exact, but far inside a seed change.
    assert two["max_abs_r_difference"] < 0.1 * two["seed_noise"]
    assert two["agrees"] and two["scaling_efficiency"] > 0
    assert "| ewc | 2 |" in (out / "multigpu.md").read_text()
