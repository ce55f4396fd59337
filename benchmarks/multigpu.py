"""Multi-GPU scaling and agreement of the continual-learning engine (issue 7).

Each run of the config (a strategy with its model settings) goes through ``metakv-cl fit`` on 1
GPU and on N GPUs (Lightning DDP; NCCL, with NVLink multicast off), with the global mini-batch
fixed, so every N takes the same optimizer steps. A second seed on 1 GPU measures the noise a
seed change makes. The table reports, per run and N:

* scaling efficiency: the stream's time on 1 GPU / (N x its time on N GPUs), which is tokens/s on
  N GPUs over N x tokens/s on 1 GPU (the same tokens at every N; targets >= 0.9 at N = 2, >= 0.85
  at 4). The stream's time is the runner's ``wall_time_s`` (training, consolidation, evaluation),
  without the process start and model loading, which the table lists apart;
* agreement: the largest |R_N - R_1| over the R matrix, against the largest |R_1(seed 1) - R_1|.

::

    python benchmarks/multigpu.py --devices 1 2 4 --out-dir benchmarks/results/multigpu      # N GPUs
    python benchmarks/multigpu.py --config toy.yaml --accelerator cpu --devices 1 2 --out-dir out  # gloo, CPU

It writes ``multigpu.json`` and ``multigpu.md`` (with the command) into ``--out-dir``; each run's
``metakv-cl`` output stays under ``--out-dir/runs``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "benchmarks" / "multigpu.yaml"
NOISE_SEED = 1
# NVLink multicast stays off (a program using it can take a shared host's GPUs out of service).
NO_NVLINK_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def fit_config(config: dict[str, Any], run: str, devices: int, seed: int, accelerator: str | None, root: Path) -> dict[str, Any]:
    """The ``metakv-cl fit`` config of one run on ``devices`` devices."""
    if run not in config["runs"]:
        raise ValueError(f"unknown run {run!r}; the config has {', '.join(config['runs'])}")
    global_batch = config["global_train_mb_size"]
    if global_batch % devices:
        raise ValueError(f"global_train_mb_size {global_batch} does not split over {devices} devices")
    fit = copy.deepcopy(config["base"])
    spec = config["runs"][run]
    fit["seed_everything"] = seed
    fit["model"]["init_args"].update(spec.get("model", {}))
    fit["strategy"] = copy.deepcopy(spec["strategy"])
    fit["strategy"].setdefault("init_args", {})["train_mb_size"] = global_batch // devices
    trainer = fit["trainer"]
    trainer.update(devices=devices, strategy="ddp" if devices > 1 else "auto", default_root_dir=str(root))
    if accelerator is not None:
        trainer["accelerator"] = accelerator
    return fit


def run_fit(fit: dict[str, Any], root: Path) -> dict[str, Any]:
    """Run ``metakv-cl fit`` on ``fit`` in a fresh process: its R matrix, the stream's seconds and the process's."""
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
    return {"matrix": method["matrix"], "stream_s": method["extra"]["wall_time_s"], "process_s": seconds,
            "score_name": method["score_name"]}


def largest_difference(a: list[list[float | None]], b: list[list[float | None]]) -> float:
    """max |a - b| over the entries both R matrices have."""
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b) if x is not None and y is not None)


def measure(config: dict[str, Any], runs: list[str], devices: list[int], accelerator: str | None, out_dir: Path) -> list[dict]:
    """Every run at every device count, plus the noise seed on one device; one row per (run, N)."""
    if devices[0] != 1:
        raise ValueError(f"--devices must start with 1 (the reference), got {devices}")
    rows = []
    seed = config["base"].get("seed_everything", 0)
    for run in runs:
        results = {}
        for count in devices:
            root = out_dir / "runs" / run / f"devices{count}"
            print(f"[multigpu] {run} on {count} device(s)", flush=True)
            results[count] = run_fit(fit_config(config, run, count, seed, accelerator, root), root)
        noise_root = out_dir / "runs" / run / f"devices1_seed{NOISE_SEED}"
        print(f"[multigpu] {run} on 1 device, seed {NOISE_SEED}", flush=True)
        noise = run_fit(fit_config(config, run, 1, NOISE_SEED, accelerator, noise_root), noise_root)
        seed_noise = largest_difference(noise["matrix"], results[1]["matrix"])
        for count, result in results.items():
            difference = largest_difference(result["matrix"], results[1]["matrix"])
            rows.append({"run": run, "devices": count, "stream_s": result["stream_s"], "process_s": result["process_s"],
                         "scaling_efficiency": results[1]["stream_s"] / (count * result["stream_s"]),
                         "max_abs_r_difference": difference, "seed_noise": seed_noise,
                         "agrees": difference <= seed_noise, "score_name": result["score_name"],
                         "matrix": result["matrix"]})
    return rows


def write_report(rows: list[dict], out_dir: Path, command: str) -> None:
    lines = ["# Multi-GPU scaling and agreement (issue 7)", "", f"Command: `{command}`", "",
             "| run | devices | stream s | process s | scaling efficiency | max abs R difference to 1 device | seed-change noise | within noise |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['devices']} | {row['stream_s']:.1f} | {row['process_s']:.1f} | {row['scaling_efficiency']:.3f} | "
                     f"{row['max_abs_r_difference']:.4f} | {row['seed_noise']:.4f} | {'yes' if row['agrees'] else 'no'} |")
    (out_dir / "multigpu.md").write_text("\n".join(lines) + "\n")
    (out_dir / "multigpu.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--runs", nargs="+", default=None, help="runs of the config (default: all)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accelerator", default=None, help="override the config's accelerator (cpu: gloo DDP)")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"config {args.config} does not exist")
    config = yaml.safe_load(args.config.read_text())
    unknown = set(config) - {"global_train_mb_size", "base", "runs"}
    if unknown:
        parser.error(f"{args.config}: unknown keys {sorted(unknown)} (expected global_train_mb_size, base, runs)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = measure(config, args.runs or list(config["runs"]), args.devices, args.accelerator, args.out_dir)
    write_report(rows, args.out_dir, " ".join(["python", "benchmarks/multigpu.py", *(argv if argv is not None else sys.argv[1:])]))
    print((args.out_dir / "multigpu.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
