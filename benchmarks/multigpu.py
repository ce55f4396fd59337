"""Multi-GPU scaling and agreement of the continual-learning engine (issue 7).

Each run of the config (a strategy with its model settings) goes through ``metakv-cl fit`` on 1
GPU and on N GPUs (Lightning DDP; NCCL, with NVLink multicast off), in two parts:

* agreement: the stream of the config's ``base``, with the global mini-batch fixed
  (``global_train_mb_size``), so every N takes the same optimizer steps. A second seed on 1 GPU
  measures the noise a seed change makes; the table compares the largest |R_N - R_1| over the R
  matrix with the largest |R_1(seed 1) - R_1|.
* scaling: training throughput with the mini-batch of each device fixed (the ``scaling`` section:
  ``per_device_train_mb_size``, and ``overrides`` of ``base`` if any). Tokens/s is the run's
  ``train_tokens_per_s``: every rank's training tokens over the training batches' time
  (evaluation, consolidation bookkeeping, process start and model loading left out). Scaling
  efficiency is tokens/s on N GPUs over N x tokens/s on 1 GPU (targets >= 0.9 at N = 2, >= 0.85
  at N = 4). With no overrides and the global mini-batch per device, the one-GPU fit is the
  agreement part's, run once.

::

    python benchmarks/multigpu.py --devices 1 2 4 --out-dir benchmarks/results/multigpu      # N GPUs
    python benchmarks/multigpu.py --config toy.yaml --accelerator cpu --devices 1 2 --out-dir out  # gloo, CPU

It writes ``multigpu.json`` and ``multigpu.md`` (with the command) into ``--out-dir``; each run's
``metakv-cl`` output stays under ``--out-dir/runs``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "benchmarks" / "multigpu.yaml"
PARTS = ("agreement", "scaling")
CONFIG_KEYS = {"global_train_mb_size", "scaling", "base", "runs"}
SCALING_KEYS = {"per_device_train_mb_size", "overrides"}
# NVLink multicast stays off (a program using it can take a shared host's GPUs out of service).
NO_NVLINK_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def check_config(config: dict[str, Any], source: str) -> None:
    """Raise ValueError naming the first missing or unknown key of a multigpu config."""
    if not isinstance(config, dict) or set(config) != CONFIG_KEYS:
        found = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{source}: expected the keys {sorted(CONFIG_KEYS)}, found {found}")
    scaling = config["scaling"]
    if not isinstance(scaling, dict) or "per_device_train_mb_size" not in scaling or set(scaling) - SCALING_KEYS:
        raise ValueError(f"{source}: scaling needs per_device_train_mb_size and may have overrides, "
                         f"found {sorted(scaling) if isinstance(scaling, dict) else scaling!r}")


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, dictionaries key by key (neither is changed)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def fit_config(config: dict[str, Any], run: str, devices: int, seed: int, accelerator: str | None, root: Path,
               part: str = "agreement") -> dict[str, Any]:
    """The ``metakv-cl fit`` config of one run of ``part`` on ``devices`` devices."""
    if run not in config["runs"]:
        raise ValueError(f"unknown run {run!r}; the config has {', '.join(config['runs'])}")
    if part == "agreement":
        global_batch = config["global_train_mb_size"]
        if global_batch % devices:
            raise ValueError(f"global_train_mb_size {global_batch} does not split over {devices} devices")
        fit, batch = copy.deepcopy(config["base"]), global_batch // devices
    elif part == "scaling":
        scaling = config["scaling"]
        fit, batch = merged(config["base"], scaling.get("overrides") or {}), scaling["per_device_train_mb_size"]
    else:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    spec = config["runs"][run]
    fit["seed_everything"] = seed
    fit["model"]["init_args"].update(spec.get("model", {}))
    fit["strategy"] = copy.deepcopy(spec["strategy"])
    fit["strategy"].setdefault("init_args", {})["train_mb_size"] = batch
    trainer = fit["trainer"]
    trainer.update(devices=devices, strategy="ddp" if devices > 1 else "auto", default_root_dir=str(root))
    if accelerator is not None:
        trainer["accelerator"] = accelerator
    return fit


FIT_RESULT = "multigpu_fit.json"


def run_fit(fit: dict[str, Any], root: Path) -> dict[str, Any]:
    """Run ``metakv-cl fit`` on ``fit`` in a fresh process: its R matrix, its timings and throughput.

    The result is also written to ``root/multigpu_fit.json`` next to the fit's config, so that a
    rerun of the benchmark into the same ``--out-dir`` takes finished fits from there.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(fit))
    environment = {**os.environ, **NO_NVLINK_MULTICAST, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "metakv_cl.cli", "fit", "--config", str(path)],
                               env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (root / "output.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"metakv-cl fit failed in {root} (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    method = json.loads((root / "report.json").read_text())["methods"][0]
    extra = method["extra"]
    result = {"matrix": method["matrix"], "score_name": method["score_name"], "stream_s": extra["wall_time_s"],
              "process_s": seconds, "train_tokens": extra["train_tokens"], "train_seconds": extra["train_seconds"],
              "train_tokens_per_s": extra["train_tokens_per_s"], "device": extra.get("device")}
    (root / FIT_RESULT).write_text(json.dumps({"config": fit, "result": result}))
    return result


def finished_fit(fit: dict[str, Any], root: Path) -> dict[str, Any] | None:
    """The result :func:`run_fit` left in ``root`` for this very config, or None."""
    path = root / FIT_RESULT
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved["config"] == json.loads(json.dumps(fit)) else None


def largest_difference(a: list[list[float | None]], b: list[list[float | None]]) -> float:
    """max |a - b| over the entries both R matrices have."""
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b) if x is not None and y is not None)


class Fits:
    """Runs the fits of one config, each distinct ``metakv-cl fit`` config once.

    When the scaling part's per-device mini-batch equals the global one and it overrides
    nothing, its one-device fit is the agreement part's, and is reused.
    """

    def __init__(self, config: dict[str, Any], accelerator: str | None, out_dir: Path):
        self.config, self.accelerator, self.out_dir = config, accelerator, out_dir
        self.base_seed = config["base"].get("seed_everything", 0)
        self.done: dict[str, dict[str, Any]] = {}

    def __call__(self, run: str, part: str, devices: int, seed: int | None = None) -> dict[str, Any]:
        """:func:`run_fit`'s result (and ``root``) for ``run`` of ``part`` on ``devices`` devices."""
        seed = self.base_seed if seed is None else seed
        root = self.out_dir / "runs" / part / run / (f"devices{devices}" + (f"_seed{seed}" if seed != self.base_seed else ""))
        fit = fit_config(self.config, run, devices, seed, self.accelerator, root, part)
        key = yaml.safe_dump({**fit, "trainer": {k: v for k, v in fit["trainer"].items() if k != "default_root_dir"}})
        label = f"{part}: {run} on {devices} device(s), seed {seed}"
        if key in self.done:
            print(f"[multigpu] {label}: the same fit as {self.done[key]['root']}", flush=True)
        elif (finished := finished_fit(fit, root)) is not None:
            print(f"[multigpu] {label}: finished earlier in {root}", flush=True)
            self.done[key] = {**finished, "root": str(root)}
        else:
            print(f"[multigpu] {label}", flush=True)
            self.done[key] = {**run_fit(fit, root), "root": str(root)}
        return self.done[key]


def measure_agreement(fits: Fits, run: str, devices: list[int],
                      known_noise: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """R on every device count against R on one, and a seed change on one as the noise.

    ``known_noise`` (run -> seed-change noise of an earlier report of the same config) stands
    in for the second seed's fit.
    """
    results = {count: fits(run, "agreement", count) for count in devices}
    if known_noise is not None and run in known_noise:
        seed_noise = known_noise[run]
    else:
        noise = fits(run, "agreement", 1, seed=fits.base_seed + 1)
        seed_noise = largest_difference(noise["matrix"], results[1]["matrix"])
    rows = []
    for count, result in results.items():
        difference = largest_difference(result["matrix"], results[1]["matrix"])
        rows.append({"run": run, "devices": count, **result, "max_abs_r_difference": difference,
                     "seed_noise": seed_noise, "agrees": difference <= seed_noise})
    return rows


def seed_noise_of(report_path: Path) -> dict[str, float]:
    """run -> seed-change noise, from an earlier ``multigpu.json``.

    Raises:
        ValueError: the file is not such a report.
    """
    try:
        return {row["run"]: row["seed_noise"] for row in json.loads(report_path.read_text())["agreement"]
                if row["devices"] == 1}
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{report_path} is not a multigpu.json report with agreement rows ({error!r})") from None


def measure_scaling(fits: Fits, run: str, devices: list[int]) -> list[dict[str, Any]]:
    """Training tokens/s on every device count, the mini-batch of each device fixed."""
    results = {count: fits(run, "scaling", count) for count in devices}
    reference = results[1]["train_tokens_per_s"]
    if reference is None:
        raise RuntimeError(f"{run}: the one-device fit trained nothing, so there is no throughput to scale")
    mixed = {count: result["device"] for count, result in results.items() if result["device"] != results[1]["device"]}
    if mixed:  # a rerun into an --out-dir filled on another machine
        raise RuntimeError(f"{run}: scaling compares fits on different devices ({results[1]['device']} against {mixed}); "
                           "use a fresh --out-dir")
    per_device = fits.config["scaling"]["per_device_train_mb_size"]
    return [{"run": run, "devices": count, "per_device_train_mb_size": per_device,
             **{key: value for key, value in result.items() if key != "matrix"},
             "scaling_efficiency": result["train_tokens_per_s"] / (count * reference)}
            for count, result in results.items()]


# (header, format of a row's value) of each report table; the scaling table's first.
SCALING_COLUMNS = (("run", "{run}"), ("devices", "{devices}"), ("mini-batch per device", "{per_device_train_mb_size}"),
                   ("train tokens", "{train_tokens:,}"), ("train s", "{train_seconds:.1f}"),
                   ("train tokens/s", "{train_tokens_per_s:,.0f}"), ("scaling efficiency", "{scaling_efficiency:.3f}"),
                   ("stream s", "{stream_s:.1f}"), ("process s", "{process_s:.1f}"))
AGREEMENT_COLUMNS = (("run", "{run}"), ("devices", "{devices}"),
                     ("max abs R difference to 1 device", "{max_abs_r_difference:.4f}"),
                     ("seed-change noise", "{seed_noise:.4f}"), ("within noise", "{within_noise}"),
                     ("train tokens/s", "{train_tokens_per_s:,.0f}"), ("stream s", "{stream_s:.1f}"),
                     ("process s", "{process_s:.1f}"))
TEXT_FIELDS = {"{run}", "{within_noise}"}


def markdown_table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> list[str]:
    alignments = ("---" if form in TEXT_FIELDS else "---:" for _, form in columns)  # numbers to the right
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "|".join(alignments) + "|"]
    for row in rows:
        values = {**row, "within_noise": "yes" if row.get("agrees") else "no"}
        lines.append("| " + " | ".join(form.format(**values) for _, form in columns) + " |")
    return lines


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    lines = ["# Multi-GPU scaling and agreement (issue 7)", "", f"Command: `{report['command']}`", ""]
    if report["scaling"]:
        lines += ["## Scaling (the mini-batch of each device fixed)", "", *markdown_table(SCALING_COLUMNS, report["scaling"]), ""]
    if report["agreement"]:
        lines += ["## Agreement (the global mini-batch fixed)", "", *markdown_table(AGREEMENT_COLUMNS, report["agreement"])]
    (out_dir / "multigpu.md").write_text("\n".join(lines) + "\n")
    (out_dir / "multigpu.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--runs", nargs="+", default=None, help="runs of the config (default: all)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts; the first must be 1")
    parser.add_argument("--accelerator", default=None, help="override the config's accelerator (cpu: gloo DDP)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed-noise-from", type=Path, default=None,
                        help="an earlier multigpu.json of the same config whose seed-change noise is reused (no second-seed fits)")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"config {args.config} does not exist")
    if args.devices[0] != 1 or any(count < 1 for count in args.devices):
        parser.error(f"--devices must start with 1 (the reference) and be positive, got {args.devices}")
    config = yaml.safe_load(args.config.read_text())
    try:
        check_config(config, str(args.config))
    except ValueError as error:
        parser.error(str(error))
    if args.seed_noise_from is not None and not args.seed_noise_from.is_file():
        parser.error(f"--seed-noise-from {args.seed_noise_from} does not exist")
    try:
        known_noise = seed_noise_of(args.seed_noise_from) if args.seed_noise_from is not None else None
    except ValueError as error:
        parser.error(str(error))
    runs = args.runs or list(config["runs"])
    try:  # an unknown run or a batch that does not split stops here, before any fit runs
        for run, part, count in itertools.product(runs, args.parts, args.devices):
            fit_config(config, run, count, 0, args.accelerator, args.out_dir, part)
    except ValueError as error:
        parser.error(str(error))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/multigpu.py", *(argv if argv is not None else sys.argv[1:])])
    noise_source = None if known_noise is None else {"file": str(args.seed_noise_from), "seed_noise": known_noise}
    report: dict[str, Any] = {"command": command, "seed_noise_from": noise_source, "scaling": [], "agreement": []}
    fits = Fits(config, args.accelerator, args.out_dir)
    for run in runs:
        if "agreement" in args.parts:
            report["agreement"] += measure_agreement(fits, run, args.devices, known_noise)
        if "scaling" in args.parts:
            report["scaling"] += measure_scaling(fits, run, args.devices)
        write_report(report, args.out_dir)  # what has finished survives a later run's failure
    print((args.out_dir / "multigpu.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
