"""benchmarks/multigpu.py: the GPU config's fit configs, and a gloo run of two CPU processes against one."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.multigpu import DEFAULT_CONFIG, check_config, fit_config, main


CPU_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "benchmarks" / "multigpu_cpu.yaml"


def test_fit_config_splits_the_global_batch_and_names_problems(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())  # the GPU config
    check_config(config, "multigpu.yaml")
    fit = fit_config(config, "ewc", 2, 5, None, tmp_path / "root")
    assert fit["strategy"]["init_args"]["train_mb_size"] == 8 and fit["model"]["init_args"]["lr"] == 1e-4
    assert (fit["trainer"]["devices"], fit["trainer"]["strategy"], fit["seed_everything"]) == (2, "ddp", 5)
    assert fit_config(config, "metakv-replay-validated", 4, 0, None, tmp_path)["strategy"]["init_args"]["train_mb_size"] == 4
    with pytest.raises(ValueError, match="unknown run 'lwf'"):
        fit_config(config, "lwf", 1, 0, None, tmp_path)
    with pytest.raises(ValueError, match="does not split over 3 devices"):
        fit_config(config, "ewc", 3, 0, None, tmp_path)
    with pytest.raises(ValueError, match="unknown part 'speed'"):
        fit_config(config, "ewc", 1, 0, None, tmp_path, part="speed")


def test_scaling_fits_fix_the_batch_per_device_and_merge_their_overrides(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for devices in (1, 2, 3):
        fit = fit_config(config, "ewc", devices, 0, None, tmp_path, part="scaling")
        assert fit["strategy"]["init_args"]["train_mb_size"] == 16 and fit["trainer"]["devices"] == devices
    assert fit_config(config, "ewc", 1, 0, None, tmp_path, part="scaling") == fit_config(config, "ewc", 1, 0, None, tmp_path)
    config["scaling"]["overrides"] = {"data": {"init_args": {"loader_args": {"max_train_per_topic": 100}}}}
    fit = fit_config(config, "ewc", 2, 0, None, tmp_path, part="scaling")
    loader_args = fit["data"]["init_args"]["loader_args"]
    # the overrides change what they name and keep the rest of the base
    assert (loader_args["max_train_per_topic"], loader_args["max_test_per_topic"], loader_args["order"]) == (100, 16, "fixed")
    assert config["base"]["data"]["init_args"]["loader_args"]["max_train_per_topic"] == 48  # base untouched
    assert fit["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("arguments, message", [
    (["--runs", "lwf"], "unknown run 'lwf'"),
    (["--devices", "1", "3"], "does not split over 3 devices"),
])
def test_bad_runs_and_device_counts_stop_before_any_fit(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(CPU_CONFIG), *arguments, "--out-dir", str(tmp_path / "out")])
    assert message in capsys.readouterr().err and not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("scaling"), "expected the keys"),
    (lambda c: c.update(typo=1), "expected the keys"),
    (lambda c: c["scaling"].pop("per_device_train_mb_size"), "per_device_train_mb_size"),
    (lambda c: c["scaling"].update(devices=2), "per_device_train_mb_size"),
])
def test_config_problems_are_named(change, message, tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    change(config)
    with pytest.raises(ValueError, match=message):
        check_config(config, "multigpu.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--out-dir", str(tmp_path / "out")])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the gloo test runs on Linux CI")
def test_two_cpu_processes_agree_with_one_and_the_report_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", str(CPU_CONFIG), "--runs", "ewc", "--devices", "1", "2", "--out-dir", str(out)]) == 0
    report = json.loads((out / "multigpu.json").read_text())
    agreement, scaling = report["agreement"], report["scaling"]
    assert [(row["run"], row["devices"]) for row in agreement] == [("ewc", 1), ("ewc", 2)]
    two = agreement[1]
    # EWC's Fisher batches differ in DDP (4 items a rank against 8), so not exact, but far inside a seed change.
    assert two["max_abs_r_difference"] < 0.1 * two["seed_noise"]
    assert two["agrees"]
    # the same tokens trained whatever the device count; efficiency from the runs' own tokens/s
    assert agreement[0]["train_tokens"] == two["train_tokens"] > 0
    assert [(row["devices"], row["per_device_train_mb_size"]) for row in scaling] == [(1, 8), (2, 8)]
    # the one-device scaling fit is the agreement's one (same config), run once
    assert scaling[0]["root"] == agreement[0]["root"] and scaling[1]["root"] != agreement[1]["root"]
    assert scaling[1]["train_tokens"] == agreement[0]["train_tokens"]  # 2 x 8 items a step: the same epochs
    assert scaling[0]["scaling_efficiency"] == 1.0
    assert scaling[1]["scaling_efficiency"] == pytest.approx(
        scaling[1]["train_tokens_per_s"] / (2 * scaling[0]["train_tokens_per_s"]))
    markdown = (out / "multigpu.md").read_text()
    assert "## Scaling" in markdown and "## Agreement" in markdown and "| ewc | 2 |" in markdown
    # a rerun into the same folder takes the finished fits instead of running them again
    assert main(["--config", str(CPU_CONFIG), "--runs", "ewc", "--devices", "1", "2", "--out-dir", str(out)]) == 0
    assert json.loads((out / "multigpu.json").read_text())["agreement"] == agreement
    assert "finished earlier in" in capsys.readouterr().out
    # the seed-change noise of an earlier report stands in for the second seed's fit
    again = tmp_path / "again"
    assert main(["--config", str(CPU_CONFIG), "--runs", "ewc", "--devices", "1", "--parts", "agreement",
                 "--seed-noise-from", str(out / "multigpu.json"), "--out-dir", str(again)]) == 0
    assert json.loads((again / "multigpu.json").read_text())["agreement"][0]["seed_noise"] == two["seed_noise"]
    assert not (again / "runs" / "agreement" / "ewc" / "devices1_seed1").exists()
