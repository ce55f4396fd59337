"""The continual-learning benchmark suite: every strategy on every stream, several seeds, one GPU.

A suite config (``configs/benchmarks/cl_suite.yaml``) names models, streams, methods and
*plans* (which models x streams x methods to run, with a priority). Every (model, stream,
method, seed) is one *cell*: one :func:`~metakv_cl.training.runner.run_stream` of one strategy.
Commands::

    python benchmarks/cl_suite.py plan   [--config C] [--plans P ...] [--methods M ...] [--streams S ...]  # cells, estimate
    python benchmarks/cl_suite.py run    [--config C] [--plans P ...] [--methods M ...] [--streams S ...] --workers 8 --time-budget 480 \\
                                         [--pack OUT.tar.gz] [--commit SHA]
    python benchmarks/cl_suite.py tune   [--config C] --runs-dir DIR [DIR ...] [--out DIR/tuning.json]
    python benchmarks/cl_suite.py report [--config C] --runs-dir DIR [DIR ...] [--out benchmarks/results/cl_suite]

``run`` starts ``--workers`` worker processes on the one GPU (a 135M model leaves most of an H100
idle, so parallel runs are what fills it). Workers take cells from a shared, ordered list (plan
priority, then seed, then the longest cell first) by creating a claim file, and write each
finished cell's result as JSON at once (``<runs-dir>/results/<model>/<stream>/<method>/seed<k>.json``),
so a call that is killed keeps every finished cell. Cells whose JSON exists are skipped: unpack
an earlier call's pack into the runs dir and the next call continues where it stopped.
Within ``--time-budget`` seconds a worker starts no cell that its (online-calibrated) estimate
says cannot finish; at the budget the workers are stopped. A cell keeps its stream state (weights
included) after every experience in ``scratch/cells/`` until its result is written, so a cell
that the budget stopped resumes at that experience in the next call on the same runs dir, and
the estimate counts only what it has left. ``--pack`` writes the runs dir's results, call
records, logs and tuned choices (no weights) into one tar.gz.

``report`` merges the results of any number of runs dirs (several calls) and writes one folder
per (model, stream) under ``--out``, listed in ``INDEX.md``: ``README.md`` (mean +- std over seeds of average,
forgetting, BWT, FWT, perplexity, wall time, peak GPU memory, trainable parameters; where
Meta-KV consolidation does not beat a baseline; every method's mean R), ``results.json`` and
plots (mean-R heatmaps, forgetting per method); its header names the exact command, commit, GPU
and date of the calls that produced the cells, and the stream's protocol table. ``protocol.json``
and the index add each declared contrast on every stream of its table, Holm-adjusted across them.

The protocol (``benchmarks/cl_protocol.py``) is part of the config and checked before anything
runs: each table's contrasts and reference, the tuning grids (one size for every method), the
validated schedule and the fixed-compute arm. A ``tune: true`` plan runs every grid point on the
development stream (cells ``<method>.grid<i>``); ``tune`` writes each method's choice to
``<runs-dir>/tuning.json``, which the cells of ``tuned: true`` plans read. A ``compute: fixed``
plan's cells (``<method>.fixed-compute``) train the same item-passes.

Design choices, all in the config: ``data_seed`` draws the stream data (subsets, splits), fixed
across the training seeds, which vary initialisation of added parameters, data order and
dropout; every method that replays gets the stream's one ``replay_buffer`` (``buffer_size``, in
training items); baselines run on the plain model, Meta-KV methods on the same model with Meta-KV
added (which computes exactly the plain model at initialisation).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import gc
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "benchmarks" / "cl_suite.yaml"
RESULTS_DIR = "results"
CLAIMS_DIR = "claims"
CALLS_DIR = "calls"
LOGS_DIR = "logs"
SCRATCH_DIR = "scratch"
CELLS_DIR = "cells"
PLAN_FILE = "plan.json"
TUNING_FILE = "tuning.json"
README_BLOCK = "cl_suite primary contrasts"  # the README's block that `report --readme` rewrites
log = logging.getLogger("cl_suite")


def _map_source_checkout() -> None:
    """Make ``metakv_cl.strategies`` / ``metakv_cl.benchmarks`` importable from a source checkout.

    ``pip install`` maps the top-level ``strategies/`` and ``benchmarks/`` folders into the
    ``metakv_cl`` package; with only the checkout on ``PYTHONPATH`` (the GPU machine) the
    repository root is added to the package's search path, which maps them the same way.
    """
    import importlib.util

    import metakv_cl

    if importlib.util.find_spec("metakv_cl.strategies") is None:
        metakv_cl.__path__.append(str(REPO_ROOT))


_map_source_checkout()

import torch  # noqa: E402
import yaml  # noqa: E402

from metakv_cl.benchmarks.cl_protocol import (  # noqa: E402
    COMPUTE_ARMS,
    METHOD_ADDITIONS,
    Family,
    check_grids,
    check_validated_twins,
    contrast_differences,
    contrast_markdown,
    fixed_compute_steps,
    grid_points,
    nominal_item_passes,
    parse_protocol,
    check_scoring,
    literature_comparison,
    literature_markdown,
    parse_literature,
    readme_contrasts,
    select_points,
    tuning_markdown,
)
from metakv_cl.report import MethodResult, json_text, replace_generated_block, write_seed_report  # noqa: E402
from metakv_cl.runfolder import atomic_write_text  # noqa: E402
from metakv_cl.training.runner import STATE_DIR  # noqa: E402
from metakv_cl.strategies import ContinualStrategy  # noqa: E402
from metakv_cl.strategies.plugins import Replay, Validated  # noqa: E402


# --------------------------------------------------------------------------- the suite config


@dataclass(frozen=True)
class Cell:
    """One run: a method on a stream with a model and a seed."""

    model: str
    stream: str
    method: str
    seed: int
    priority: int = 0
    plan: str = ""
    grid_point: int = -1  # a tuning plan's grid point (-1: none)
    compute: str = "nominal"  # or "fixed": the fixed-compute arm

    @property
    def label(self) -> str:
        """The method's name in results and reports: the method, its grid point or compute arm added."""
        suffix = f".grid{self.grid_point}" if self.grid_point >= 0 else ""
        return self.method + suffix + (".fixed-compute" if self.compute == "fixed" else "")

    @property
    def key(self) -> str:
        return f"{self.model}/{self.stream}/{self.label}/seed{self.seed}"

    def result_path(self, runs_dir: Path) -> Path:
        return runs_dir / RESULTS_DIR / self.model / self.stream / self.label / f"seed{self.seed}.json"

    def error_path(self, runs_dir: Path) -> Path:
        return self.result_path(runs_dir).with_suffix(".error.txt")

    def run_folder(self, runs_dir: Path) -> Path:
        """The cell's run folder: its stream state after every experience, until its result is written.

        The same in every call, so a cell that a call's time budget stopped resumes in the next
        call at the experience it reached.
        """
        return runs_dir / SCRATCH_DIR / CELLS_DIR / self.key

    def share_done(self, runs_dir: Path) -> float:
        """The share of the cell's experiences that a stopped call finished (0 when none)."""
        progress = self.run_folder(runs_dir) / STATE_DIR / "progress.json"
        if not progress.is_file():
            return 0.0
        record = json.loads(progress.read_text())
        return int(record["next_experience"]) / max(1, int(record["num_experiences"]))


class Suite:
    """A suite config: models, streams, methods, plans, protocol, tuning, seeds, Trainer settings, throughput.

    Args:
        config: the parsed YAML (see ``configs/benchmarks/cl_suite.yaml`` for every key).
        source: where it came from (for error messages).

    Raises:
        ValueError: a missing section, a plan naming an unknown model, stream or method, a
            protocol naming a method its plan does not run (:func:`parse_protocol`), a validated
            method without its unvalidated twin, tuning grids of unequal size, a stream that sets
            its own ``seed`` (the data seed is ``data_seed``), or another bad value (named).
    """

    SECTIONS = ("models", "streams", "methods", "plans", "protocol", "seeds", "data_seed", "trainer")

    def __init__(self, config: dict[str, Any], source: str = "suite config"):
        missing = [key for key in self.SECTIONS if key not in config]
        if missing:
            raise ValueError(f"{source}: missing section(s) {missing}")
        self.config = config
        self.source = source
        self.models: dict[str, dict] = config["models"]
        self.streams: dict[str, dict] = config["streams"]
        self.methods: dict[str, dict] = config["methods"]
        self.plans: dict[str, dict] = config["plans"]
        self.seeds: list[int] = [int(seed) for seed in config["seeds"]]
        self.trainer: dict[str, Any] = dict(config["trainer"])
        self.throughput: dict[str, Any] = dict(config.get("throughput", {}))
        for name, plan in self.plans.items():
            for section, known in (("models", self.models), ("streams", self.streams), ("methods", self.methods)):
                unknown = [entry for entry in plan.get(section, []) if entry not in known]
                if unknown or not plan.get(section):
                    raise ValueError(f"{source}: plan {name!r} lists unknown or no {section}: {unknown or '[]'}; "
                                     f"known: {sorted(known)}")
        self.data_seed = int(config["data_seed"])
        self.schedules: dict[str, dict] = dict(config.get("schedules", {}))
        self.tuning: dict[str, Any] = dict(config.get("tuning", {}))
        for name, method in self.methods.items():
            if method.get("lr", "full") not in ("full", "adapter", "metakv"):
                raise ValueError(f"{source}: method {name!r}: lr must be full, adapter or metakv, got {method['lr']!r}")
            unknown = [extra for extra in method.get("with", []) if extra not in METHOD_ADDITIONS]
            if unknown:
                raise ValueError(f"{source}: method {name!r}: with: {unknown[0]!r} is not one of "
                                 f"{list(METHOD_ADDITIONS)}")
            if method.get("targets", "kv") != "kv":
                raise ValueError(f"{source}: method {name!r}: targets must be kv, got {method['targets']!r}")
            if "validated" in method.get("with", []) and "validated" not in self.schedules:
                raise ValueError(f"{source}: method {name!r} uses the validated schedule; add schedules.validated "
                                 "(validation_fraction, patience, max_epochs)")
        for name, stream in self.streams.items():
            check_scoring(stream.get("scoring", {}), f"{source}: stream {name!r}")
            if "seed" in stream.get("loader_args", {}):
                raise ValueError(f"{source}: stream {name!r}: loader_args.seed is not allowed; the data seed is "
                                 "data_seed (suite-wide, or the stream's own data_seed)")
        self._check_development_items()
        for name, plan in self.plans.items():
            self._check_plan(name, plan)
        self.families = parse_protocol(config["protocol"], self.plans, source)
        self.literature = parse_literature(config.get("literature", []), self.plans, source)
        check_validated_twins(self.plans, self.methods, source)
        tuned = [m for plan in self.plans.values() if plan.get("tune") for m in plan["methods"]]
        if tuned:
            check_grids(self.tuning.get("grids", {}), tuned, self.tunable_keys, source)

    def _check_plan(self, name: str, plan: dict) -> None:
        """A plan's compute arm, its K/V targets and its development streams (only in tuning plans)."""
        if plan.get("compute", "nominal") not in COMPUTE_ARMS:
            raise ValueError(f"{self.source}: plan {name!r}: compute must be one of {list(COMPUTE_ARMS)}, "
                             f"got {plan['compute']!r}")
        if plan.get("tune") and plan.get("tuned"):
            raise ValueError(f"{self.source}: plan {name!r} cannot both tune and read tuned values")
        for stream in plan["streams"]:
            development = bool(self.streams[stream].get("loader_args", {}).get("development"))
            if development != bool(plan.get("tune")):
                raise ValueError(f"{self.source}: plan {name!r}: stream {stream!r} " + (
                    "is a development stream, which only a tune: true plan may run" if development else
                    "is not a development stream (loader_args.development: true), which a tune: true plan needs"))
        for method in plan["methods"]:
            if self.methods[method].get("targets") == "kv":
                lacking = [m for m in plan["models"] if not self.models[m].get("kv_projections")]
                if lacking:
                    raise ValueError(f"{self.source}: plan {name!r}: method {method!r} adapts K/V, but model "
                                     f"{lacking[0]!r} names no kv_projections (separate K and V projection modules)")

    def _check_development_items(self) -> None:
        """Every stream of a development stream's loader sets aside the same items, so none reaches a report."""
        for name, stream in self.streams.items():
            if not stream.get("loader_args", {}).get("development"):
                continue
            count = stream["loader_args"].get("development_items")
            for other, spec in self.streams.items():
                if spec["loader"] == stream["loader"] and spec.get("loader_args", {}).get("development_items") != count:
                    raise ValueError(f"{self.source}: stream {other!r} must set loader_args.development_items: {count} "
                                     f"like the development stream {name!r}, or it may train or test on its items")

    def tunable_keys(self, method: str) -> set[str]:
        """What a tuning grid may set for a method: ``lr`` and its strategy's own arguments."""
        return {"lr"} | (init_parameters(strategy_class(self.methods[method]["class_path"]))
                         - init_parameters(ContinualStrategy))

    def replays(self, method: str) -> bool:
        """Whether the method trains on a replay buffer (its own, or one added by ``with: [replay]``)."""
        spec = self.methods[method]
        return "replay" in spec.get("with", []) or "buffer_size" in init_parameters(strategy_class(spec["class_path"]))

    def epochs(self, method: str, stream: str) -> int:
        """Epochs per experience of the method's fits: the validated schedule's maximum, else the stream's."""
        spec = self.methods[method]
        if "validated" in spec.get("with", []):
            return int(self.schedules["validated"]["max_epochs"])
        return int(spec.get("init_args", {}).get("consolidation_epochs") or self.streams[stream].get("epochs", 1))

    def item_passes(self, method: str, stream: str, items: float) -> float:
        """Nominal training item-passes per experience (:func:`nominal_item_passes`)."""
        return nominal_item_passes(self.epochs(method, stream), items, int(self.streams[stream]["replay_buffer"]),
                                   self.replays(method), int(self.methods[method].get("fits_per_experience", 1)))

    def compute_budget(self, plan: str, stream: str, items: float) -> float:
        """Item-passes per experience of a fixed-compute plan: its most expensive method's nominal ones."""
        return max(self.item_passes(method, stream, items) for method in self.plans[plan]["methods"])

    def stream_data_seed(self, stream: str) -> int:
        """The seed that draws a stream's items (the stream's own ``data_seed``, else the suite's)."""
        return int(self.streams[stream].get("data_seed", self.data_seed))

    @classmethod
    def load(cls, path: str | Path) -> "Suite":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"suite config not found: {path}")
        return cls(yaml.safe_load(path.read_text()), str(path))

    def cells(self, plans: Sequence[str] | None = None, methods: Sequence[str] | None = None,
              streams: Sequence[str] | None = None) -> list[Cell]:
        """Every cell of the chosen plans (all by default), without duplicates, in plan order.

        Args:
            plans: the plans whose cells to list (default: all).
            methods: keep only these methods' cells (default: all).
            streams: keep only these streams' cells (default: all). Either filter keeps the plans'
                own cells, so a later call without it runs only the rest.

        Raises:
            ValueError: an unknown plan, method or stream name.
        """
        names = list(plans) if plans else list(self.plans)
        unknown = [name for name in names if name not in self.plans]
        if unknown:
            raise ValueError(f"unknown plan(s) {unknown}; known: {sorted(self.plans)}")
        for option, chosen, known in (("--methods", methods, self.methods), ("--streams", streams, self.streams)):
            unknown = [name for name in chosen or () if name not in known]
            if unknown:
                raise ValueError(f"unknown name(s) {unknown} in {option}; known: {sorted(known)}")
        cells: dict[str, Cell] = {}
        for name in names:
            plan = self.plans[name]
            for seed in plan.get("seeds", self.seeds):
                for model in plan["models"]:
                    for stream in (name for name in plan["streams"] if not streams or name in streams):
                        for method in (m for m in plan["methods"] if not methods or m in methods):
                            points = (range(len(grid_points(self.tuning["grids"][method]))) if plan.get("tune")
                                      else [-1])
                            for point in points:
                                cell = Cell(model, stream, method, int(seed), int(plan.get("priority", 0)), name,
                                            point, plan.get("compute", "nominal"))
                                cells.setdefault(cell.key, cell)
        return list(cells.values())


# --------------------------------------------------------------------------- building runs


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Workbench:
    """Builds and runs cells in one process, caching streams and base models across cells.

    Args:
        suite: the suite.
        runs_dir: the runs folder (results, scratch run folders, warm-up weights).
        call_id: this call's id (stored in every result).
        concurrency: how many cells run at once on the device (stored in every result).
    """

    def __init__(self, suite: Suite, runs_dir: Path, call_id: str = "local", concurrency: int = 1):
        self.suite, self.runs_dir, self.call_id, self.concurrency = suite, runs_dir, call_id, concurrency
        self._streams: dict[tuple[str, str], Any] = {}
        self._benchmarks: dict[tuple[str, str], Any] = {}
        self._base_models: dict[str, torch.nn.Module] = {}
        self._tuned: dict[str, Any] | None = None

    # ------------------------------------------------------------------ data

    def stream(self, model_name: str, stream_name: str):
        """The :class:`~metakv_cl.data.TaskStream` of a stream for a model (its tokenizer, warm-up)."""
        from metakv_cl.data import TaskStream

        key = (model_name, stream_name)
        if key not in self._streams:
            model, spec = self.suite.models[model_name], self.suite.streams[stream_name]
            warmup = model.get("warmup") or {}
            self._streams[key] = TaskStream(
                loader=spec["loader"],
                loader_args={**spec.get("loader_args", {}), "seed": self.suite.stream_data_seed(stream_name)},
                tokenizer=model["tokenizer"],
                compact_vocabulary=bool(model.get("compact_vocabulary", False)),
                max_length=int(spec["max_length"]),
                overflow=spec.get("overflow", "chunk"),
                warmup_loader=warmup.get("loader"),
                warmup_loader_args=warmup.get("loader_args", {}),
                warmup_epochs=int(warmup.get("epochs", 1)),
            )
        return self._streams[key]

    def benchmark(self, model_name: str, stream_name: str):
        """The tokenised :class:`~metakv_cl.data.LMBenchmark` (built once per process)."""
        key = (model_name, stream_name)
        if key not in self._benchmarks:
            self._benchmarks[key] = self.stream(model_name, stream_name).build()
        return self._benchmarks[key]

    # ------------------------------------------------------------------ models

    def trainer_kwargs(self, stream_name: str, root: Path, epochs: int | None = None) -> dict[str, Any]:
        kwargs = {**self.suite.trainer, "max_epochs": epochs or int(self.suite.streams[stream_name].get("epochs", 1))}
        kwargs["default_root_dir"] = str(root)
        return kwargs

    def hyperparameters(self, cell: Cell) -> dict[str, Any]:
        """The values a cell's method runs with beyond its spec: a grid point, or the tuned choice.

        Raises:
            FileNotFoundError: a ``tuned: true`` plan without ``<runs dir>/tuning.json``.
            KeyError: the tuning file has no choice for the cell's model and method.
        """
        if cell.grid_point >= 0:
            return grid_points(self.suite.tuning["grids"][cell.method])[cell.grid_point]
        if not self.suite.plans[cell.plan].get("tuned"):
            return {}
        if self._tuned is None:
            path = self.runs_dir / TUNING_FILE
            if not path.is_file():
                raise FileNotFoundError(f"plan {cell.plan!r} runs tuned values, and {path} does not exist: run the "
                                        "tuning plans, then `cl_suite.py tune`, first")
            self._tuned = json.loads(path.read_text())["chosen"]
        try:
            return self._tuned[cell.model][cell.method]["chosen"]
        except KeyError:
            raise KeyError(f"{self.runs_dir / TUNING_FILE} has no tuned values for {cell.model}/{cell.method}; "
                           "add the method to a tuning plan and tune again") from None

    def base_model(self, cell: Cell) -> torch.nn.Module:
        """The plain model a cell starts from: pretrained weights, or warmed-up from-scratch ones."""
        from metakv_cl.hub import load_causal_lm
        from metakv_cl.training.callbacks import derived_seed, seed_all

        spec = self.suite.models[cell.model]
        if not spec.get("from_scratch", False):
            if cell.model not in self._base_models:
                self._base_models[cell.model] = load_causal_lm(spec["model"], **spec.get("load_args", {}))
            return copy.deepcopy(self._base_models[cell.model])
        stream = self.stream(cell.model, cell.stream)
        benchmark = self.benchmark(cell.model, cell.stream)
        seed_all(derived_seed(cell.seed, "model-init"))
        model = load_causal_lm(spec["model"], from_scratch=True, config_overrides={
            **spec.get("config_overrides", {}), "vocab_size": stream.vocab_size or len(stream.tokenizer())})
        if spec.get("warmup"):
            self._warm_up(cell, model, stream, benchmark)
        return model

    def _warm_up(self, cell: Cell, model: torch.nn.Module, stream, benchmark) -> None:
        """Warm the from-scratch model up (once per model, seed and vocabulary; cached on disk)."""
        from metakv_cl.training import ContinualLMModule, warm_up

        spec = self.suite.models[cell.model]
        tokenizer = stream.tokenizer()
        vocabulary = getattr(tokenizer, "to_original", None) or len(tokenizer)
        key = _fingerprint(cell.model, spec, cell.seed, [i.name for i in benchmark.warmup_infos],
                           [i.num_train_items for i in benchmark.warmup_infos], vocabulary)
        folder = self.runs_dir / SCRATCH_DIR / "warmup" / f"{cell.model}-seed{cell.seed}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        holder = ContinualLMModule(model, lr=float(spec["warmup"].get("lr", spec["learning_rates"]["full"])))
        with open(folder / "lock", "w") as lock:  # one process trains it, the others wait and load it
            fcntl.flock(lock, fcntl.LOCK_EX)
            warm_up(holder, benchmark, root_dir=folder, epochs=stream.warmup_epochs,
                    trainer_kwargs=self.trainer_kwargs(cell.stream, folder),
                    train_mb_size=int(self.suite.streams[cell.stream].get("train_mb_size", 16)), seed=cell.seed,
                    resume=False, echo=log.info)

    def module(self, cell: Cell):
        """The :class:`ContinualLMModule` of a cell (Meta-KV added for Meta-KV methods)."""
        from metakv_cl.modeling import MetaKVConfig
        from metakv_cl.training import ContinualLMModule
        from metakv_cl.training.callbacks import derived_seed, seed_all

        model_spec, method = self.suite.models[cell.model], self.suite.methods[cell.method]
        base = self.base_model(cell)
        meta_kv = None
        if method.get("meta_kv"):
            overrides = method["meta_kv"] if isinstance(method["meta_kv"], dict) else {}
            meta_kv = MetaKVConfig.from_dict({**model_spec.get("meta_kv", {}), **overrides})
        seed_all(derived_seed(cell.seed, "added-parameters"))  # Meta-KV, LoRA: same draw for every method
        lr = self.hyperparameters(cell).get("lr", self.learning_rate(cell, method.get("lr", "full")))
        scoring = self.suite.streams[cell.stream].get("scoring", {})
        return ContinualLMModule(base, meta_kv=meta_kv, lr=float(lr), **model_spec.get("module_args", {}), **scoring)

    def learning_rate(self, cell: Cell, role: str) -> float:
        return float(self.suite.models[cell.model]["learning_rates"][role])

    def strategy(self, cell: Cell, module, root: Path):
        """The cell's strategy, with the stream's replay budget for every method that replays.

        The stream's ``train_mb_size``, ``eval_mb_size`` and ``replay_buffer`` (as ``buffer_size``)
        go to every strategy that takes them; the method's ``init_args``, ``lr_args`` and its grid
        point or tuned values come on top. ``targets: kv`` adapts the model's ``kv_projections``
        at Meta-KV's rank; ``with: [replay]`` adds a :class:`Replay` plugin of the stream's budget;
        ``with: [validated]`` gives the suite's validated schedule (Meta-KV: on its consolidation,
        others: a :class:`Validated` plugin on the training fit, up to ``max_epochs`` epochs). In
        the fixed-compute arm every fit trains :func:`fixed_compute_steps` steps instead of epochs.
        """
        method, stream = self.suite.methods[cell.method], self.suite.streams[cell.stream]
        model_spec = self.suite.models[cell.model]
        cls = strategy_class(method["class_path"])
        defaults = {
            "train_mb_size": int(stream.get("train_mb_size", 16)),
            "eval_mb_size": int(stream.get("eval_mb_size", 32)),
            "buffer_size": int(stream["replay_buffer"]),
            "name": cell.label,
        }
        accepted = init_parameters(cls)
        arguments = {key: value for key, value in defaults.items() if key in accepted}
        arguments.update(method.get("init_args", {}))
        arguments.update({name: self.learning_rate(cell, role) for name, role in method.get("lr_args", {}).items()})
        arguments.update({key: value for key, value in self.hyperparameters(cell).items() if key != "lr"})
        if method.get("targets") == "kv":
            arguments.update(target_modules=list(model_spec["kv_projections"]), rank=int(model_spec["meta_kv"]["rank"]))
        additions = method.get("with", [])
        plugins = [Replay(buffer_size=int(stream["replay_buffer"]))] if "replay" in additions else []
        epochs = None
        if "validated" in additions:
            schedule = self.suite.schedules["validated"]
            if "consolidation_epochs" in accepted:
                arguments.update(validation_fraction=float(schedule["validation_fraction"]),
                                 patience=int(schedule["patience"]), consolidation_epochs=int(schedule["max_epochs"]))
            else:
                epochs = int(schedule["max_epochs"])
                plugins.append(Validated(float(schedule["validation_fraction"]), int(schedule["patience"]),
                                         phases=["train"]))
        trainer_kwargs = self.trainer_kwargs(cell.stream, root, epochs)
        if cell.compute == "fixed":
            benchmark = self.benchmark(cell.model, cell.stream)
            items = sum(len(e.dataset) for e in benchmark.train_stream) / benchmark.num_experiences
            steps = fixed_compute_steps(self.suite.compute_budget(cell.plan, cell.stream, items),
                                        benchmark.num_experiences, bool(getattr(cls, "trains_jointly", False)),
                                        int(method.get("fits_per_experience", 1)), defaults["train_mb_size"])
            trainer_kwargs.update(max_epochs=-1, max_steps=steps)
            for key in ("consolidation_epochs", "fast_epochs"):  # the step budget decides, not epochs
                arguments.pop(key, None)
        if plugins:
            arguments["plugins"] = plugins
        return cls(**arguments, module=module, trainer_kwargs=trainer_kwargs, seed=cell.seed, root_dir=root)

    # ------------------------------------------------------------------ running

    def run(self, cell: Cell, estimated_s: float | None = None) -> MethodResult:
        """Run one cell and write its result JSON (atomically) under the runs dir.

        Args:
            cell: the cell.
            estimated_s: the scheduler's uncalibrated wall-time estimate (kept for calibration).

        Returns:
            The cell's :class:`MethodResult`; its ``extra`` also records the model, stream,
            method settings, replay budget, learning rate, concurrency, call id and estimate.
        """
        from metakv_cl.training.runner import run_stream

        root = cell.run_folder(self.runs_dir)
        resumed_at = cell.share_done(self.runs_dir)
        benchmark = self.benchmark(cell.model, cell.stream)
        started = time.perf_counter()
        module = self.module(cell)
        strategy = self.strategy(cell, module, root)
        result = run_stream(strategy, benchmark, root_dir=root, resume=True, echo=log.info)
        method = self.suite.methods[cell.method]
        result.extra.update({
            "cell": cell.key,
            "plan": cell.plan,
            "suite_method": cell.method,
            "grid_point": cell.grid_point,
            "model": cell.model,
            "stream": cell.stream,
            "method_spec": method,
            "hyperparameters": self.hyperparameters(cell),
            "data_seed": self.suite.stream_data_seed(cell.stream),
            "compute": cell.compute,
            "max_steps": strategy.trainer_kwargs.get("max_steps"),
            "buffer_size": next((p.memory.buffer_size for p in strategy.plugins if isinstance(p, Replay)), None),
            # padded batches of other sizes score in other GEMM shapes: float rounding may flip a close ranking
            "train_mb_size": strategy.train_mb_size,
            "eval_mb_size": strategy.eval_mb_size,
            "learning_rate": module.lr,
            "concurrency": self.concurrency,
            "call": self.call_id,
            "estimated_s": estimated_s,
            "cell_wall_time_s": time.perf_counter() - started,
            "resumed_at_share": resumed_at,
        })
        atomic_write_text(json_text(result.to_json()), cell.result_path(self.runs_dir))
        shutil.rmtree(root, ignore_errors=True)  # the weights of every finished cell would fill the disk
        return result


def release_memory() -> None:
    """Free what the finished cell left (its module, optimiser, caches) before the next one."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- cost estimate


def _training_tokens(dataset) -> int:
    return sum(int(dataset[i]["input_ids"].numel()) for i in range(len(dataset)))


def _evaluation_cost(dataset, batch_size: int) -> tuple[int, int]:
    """Tokens and model forward calls that one evaluation of a test set runs.

    Tokens: LM texts, or each classification prompt once + every candidate. Forward calls, per
    batch of ``batch_size`` items in order: one for LM texts; for classification the shared
    prompt pass and the candidates' pass (exact match is read off the latter:
    :func:`~metakv_cl.data.scoring.rank_choices_and_exact_match`). On a GPU the small evaluation
    batches are bound by the calls' latency more than by their tokens.
    """
    tokens = calls = 0
    for start in range(0, len(dataset), batch_size):
        classification = False
        for i in range(start, min(start + batch_size, len(dataset))):
            item = dataset[i]
            if "choice_input_ids" not in item:
                tokens += int(item["input_ids"].numel())
                continue
            labels = item["choice_labels"] != -100
            tokens += int(labels[0].float().argmax()) + int(labels.sum())
            classification = True
        calls += 2 if classification else 1
    return tokens, calls


@dataclass(frozen=True)
class Estimate:
    """What a cell costs: device seconds (whole GPU, alone) and host seconds (Trainer overheads).

    With ``workers`` cells sharing a saturated device, a cell's wall time is about
    ``device_s * workers + host_s`` (:meth:`wall_s`), and a set of cells takes about
    ``max(sum(device_s), sum(device_s + host_s) / workers)`` (:func:`total_seconds`).
    """

    device_s: float
    host_s: float

    def wall_s(self, workers: int) -> float:
        return self.device_s * workers + self.host_s


def total_seconds(estimates: Iterable[Estimate], workers: int) -> float:
    """Wall seconds ``workers`` parallel workers need for these cells (the device or the hosts bound it)."""
    estimates = list(estimates)
    return max(sum(e.device_s for e in estimates), sum(e.device_s + e.host_s for e in estimates) / workers)


def estimate_cell(suite: Suite, cell: Cell, benchmark) -> Estimate:
    """The cost of a cell (before the scheduler's online calibration).

    From the stream's token counts and the ``throughput`` section (the suite's, then the
    model's): ``train_tokens_per_s`` (forward + backward) and ``eval_tokens_per_s`` (forward) of
    the whole device, ``eval_call_s`` the device time of one evaluation forward call beyond its
    tokens (:func:`_evaluation_cost`), ``startup_s`` of the host per cell (model and strategy
    set-up), ``fit_overhead_s`` and ``eval_overhead_s`` of the host per Trainer call. A
    method's ``train_cost`` multiplies its training compute (EWC's Fisher pass, LwF's teacher,
    the fast phase of distillation), replayed items add to the training tokens, the validated
    schedule counts its maximum epochs, the fixed-compute arm its item-pass budget, joint training
    trains once and evaluates once, and ``fits_per_experience`` counts Trainer fits.
    """
    rates = {**suite.throughput, **suite.models[cell.model].get("throughput", {})}
    method, stream = suite.methods[cell.method], suite.streams[cell.stream]
    strategy = strategy_class(method["class_path"])
    joint = bool(getattr(strategy, "trains_jointly", False))
    experiences = benchmark.num_experiences
    train = [_training_tokens(e.dataset) for e in benchmark.train_stream]
    costs = [_evaluation_cost(e.dataset, int(stream.get("eval_mb_size", 32))) for e in benchmark.test_stream]
    evaluation_tokens, evaluation_calls = (sum(column) for column in zip(*costs))
    items = sum(len(e.dataset) for e in benchmark.train_stream)
    per_item = sum(train) / max(items, 1)
    if cell.compute == "fixed":
        passes = suite.compute_budget(cell.plan, cell.stream, items / experiences) * experiences
        train_tokens = passes * per_item * float(method.get("train_cost", 1.0))
    else:
        replayed = int(stream["replay_buffer"]) * per_item * (experiences - 1) if suite.replays(cell.method) else 0.0
        epochs = suite.epochs(cell.method, cell.stream)
        train_tokens = (sum(train) + replayed) * epochs * float(method.get("train_cost", 1.0))
    rows = 2 if joint else experiences + 1
    fits = (1 if joint else experiences) * int(method.get("fits_per_experience", 1))
    evaluation_s = (evaluation_tokens / float(rates.get("eval_tokens_per_s", 1.5e5))
                    + evaluation_calls * float(rates.get("eval_call_s", 0.0)))
    device_s = train_tokens / float(rates.get("train_tokens_per_s", 6e4)) + rows * evaluation_s
    host_s = (float(rates.get("startup_s", 0.0)) + fits * float(rates.get("fit_overhead_s", 0.5))
              + rows * experiences * float(rates.get("eval_overhead_s", 0.05)))
    return Estimate(device_s, host_s)


def strategy_class(class_path: str) -> type:
    """The strategy class at a dotted path (``metakv_cl.strategies.Replay``).

    Raises:
        ValueError: the path names no class.
    """
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"unknown strategy class {class_path!r}") from None


def init_parameters(cls: type) -> set[str]:
    """Keyword arguments a strategy class accepts (its own and its base classes')."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names.update(inspect.signature(klass.__init__).parameters)
    return names - {"self", "args", "kwargs"}


def whole_cell_wall_time(extra: dict[str, Any]) -> float | None:
    """A finished cell's wall seconds, or None when it resumed in a later call (its time is a part's)."""
    if extra.get("cell_wall_time_s") is None or extra.get("resumed_at_share"):
        return None
    return float(extra["cell_wall_time_s"])


def measured_wall_times(runs_dir: Path) -> dict[tuple[str, str, str], list[tuple[float, int]]]:
    """``(wall seconds, concurrency)`` of the finished cells in ``runs_dir``, by (model, stream, method label)."""
    measured: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
    for path in (runs_dir / RESULTS_DIR).glob("*/*/*/seed*.json"):
        extra = json.loads(path.read_text()).get("extra", {})
        wall = whole_cell_wall_time(extra)
        if wall is not None and extra.get("concurrency"):
            key = (path.parts[-4], path.parts[-3], path.parts[-2])
            measured.setdefault(key, []).append((wall, int(extra["concurrency"])))
    return measured


def make_plan(suite: Suite, cells: Sequence[Cell], runs_dir: Path) -> list[dict[str, Any]]:
    """The cells with their estimates, in the order workers take them.

    Where cells of the same model, stream and method (other seeds, earlier calls) have finished
    in ``runs_dir``, a cell's device seconds come from their wall times: by the estimate's model
    of sharing (:meth:`Estimate.wall_s`), ``(wall - host_s) / concurrency``, averaged, so a
    measurement taken with one number of workers predicts another; ``measured_cells`` says how
    many were averaged. Otherwise they are :func:`estimate_cell`'s.
    Order: plan priority, then seed, then the longest cell first (so the short ones fill the
    end of the budget). Cells already finished in ``runs_dir`` are marked ``done``.
    """
    bench = Workbench(suite, runs_dir)
    measured = measured_wall_times(runs_dir)
    entries = []
    for cell in cells:
        estimate = estimate_cell(suite, cell, bench.benchmark(cell.model, cell.stream))
        same_cells = measured.get((cell.model, cell.stream, cell.label), [])
        device_s = (sum(max(wall - estimate.host_s, 0.0) / concurrency for wall, concurrency in same_cells)
                    / len(same_cells) if same_cells else estimate.device_s)
        entries.append({**cell.__dict__, "key": cell.key, "device_s": device_s, "host_s": estimate.host_s,
                        "measured_cells": len(same_cells), "done": cell.result_path(runs_dir).is_file()})
    entries.sort(key=lambda e: (e["priority"], e["seed"], -(e["device_s"] + e["host_s"])))
    return entries


def _estimate(entry: dict[str, Any]) -> Estimate:
    return Estimate(entry["device_s"], entry["host_s"])


# --------------------------------------------------------------------------- workers


def _cell_from_entry(entry: dict[str, Any]) -> Cell:
    return Cell(entry["model"], entry["stream"], entry["method"], int(entry["seed"]), int(entry["priority"]),
                entry["plan"], int(entry["grid_point"]), entry["compute"])


def _claim(runs_dir: Path, call_id: str, cell: Cell) -> bool:
    """Atomically claim a cell for this call (claims of earlier, killed calls do not count)."""
    folder = runs_dir / CLAIMS_DIR / call_id
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / cell.key.replace("/", "__"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def calibration(runs_dir: Path, call_id: str, minimum: int = 3) -> float:
    """Measured / expected wall seconds over this call's finished cells (1 until ``minimum`` finished)."""
    measured = estimated = 0.0
    count = 0
    for path in (runs_dir / RESULTS_DIR).rglob("seed*.json"):
        extra = json.loads(path.read_text()).get("extra", {})
        wall = whole_cell_wall_time(extra)
        if extra.get("call") == call_id and extra.get("estimated_s") and wall is not None:
            measured += wall
            estimated += float(extra["estimated_s"])
            count += 1
    return measured / estimated if count >= minimum and estimated > 0 else 1.0


def worker_main(args: argparse.Namespace) -> int:
    """Take cells from the plan until none is left or the deadline is near; run each."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s w{args.worker_id} %(message)s", stream=sys.stdout)
    _quiet_libraries()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    suite = Suite.load(args.config)
    runs_dir = Path(args.runs_dir)
    bench = Workbench(suite, runs_dir, args.call_id, args.workers)
    plan_path = runs_dir / CALLS_DIR / args.call_id / PLAN_FILE
    scheduler = os.getppid()
    while not plan_path.is_file():  # the scheduler writes it while the workers import and load
        if os.getppid() != scheduler or time.time() > args.deadline:
            return 1
        time.sleep(0.5)
    plan = json.loads(plan_path.read_text())
    finished = 0
    for entry in plan:
        cell = _cell_from_entry(entry)
        if os.getppid() != scheduler:
            log.info("the scheduler is gone: stopping")
            break
        if cell.result_path(runs_dir).is_file():
            continue
        uncalibrated = _estimate(entry).wall_s(args.workers)
        expected = uncalibrated * calibration(runs_dir, args.call_id) * (1.0 - cell.share_done(runs_dir))
        if time.time() + expected > args.deadline:
            log.info("skip %s: needs ~%.0fs, %.0fs left", cell.key, expected, args.deadline - time.time())
            continue
        if not _claim(runs_dir, args.call_id, cell):
            continue
        log.info("start %s (estimate %.0fs with %d workers)", cell.key, expected, args.workers)
        try:
            result = bench.run(cell, uncalibrated)
            finished += 1
            log.info("done %s in %.0fs: %s", cell.key, result.extra["cell_wall_time_s"], _summary_line(result))
        except Exception:  # one failing cell must not stop the others; its traceback is kept
            cell.error_path(runs_dir).parent.mkdir(parents=True, exist_ok=True)
            cell.error_path(runs_dir).write_text(traceback.format_exc())
            log.error("FAILED %s:\n%s", cell.key, traceback.format_exc())
        release_memory()
    log.info("worker finished: %d cell(s)", finished)
    return 0


def _summary_line(result: MethodResult) -> str:
    summary = result.summary
    return ", ".join(f"{key} {summary[key]:.3f}" for key in ("average", "forgetting", "bwt", "fwt")
                     if summary.get(key) is not None)


def _quiet_libraries() -> None:
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------- the scheduler


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; pass --commit)"


def _device_description() -> str:
    """The GPUs as nvidia-smi names them (the scheduler creates no CUDA context of its own), else the CPU."""
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    if gpus:
        return f"{'; '.join(gpus)}, {os.cpu_count()} CPU cores"
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def call_record(args: argparse.Namespace, argv: Sequence[str], call_id: str) -> dict[str, Any]:
    """What the report header needs about a call: command, commit, device, date, versions."""
    import transformers

    return {
        "call": call_id,
        "command": "python benchmarks/cl_suite.py " + " ".join(argv),
        "commit": args.commit or _git_commit(),
        "device": _device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        "workers": args.workers,
        "time_budget_s": args.time_budget,
    }


class Terminated(Exception):
    """The scheduler received SIGTERM (an outer ``timeout``): stop the workers and pack first."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signum}")


def run_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start the workers, write the plan, wait within the budget, stop the workers, pack."""
    started = time.time()
    deadline = started + args.time_budget
    suite = Suite.load(args.config)
    cells = suite.cells(args.plans, args.methods, args.streams)
    runs_dir = Path(args.runs_dir)
    tuned = sorted({cell.plan for cell in cells if suite.plans[cell.plan].get("tuned")})
    if tuned and not (runs_dir / TUNING_FILE).is_file():
        raise SystemExit(f"plans {tuned} run tuned values and {runs_dir / TUNING_FILE} does not exist: run the tune: "
                         "true plans, then `cl_suite.py tune`, first (or leave these plans out with --plans)")
    call_id = args.call_id or time.strftime("%Y%m%d-%H%M%S")
    call_dir = runs_dir / CALLS_DIR / call_id
    call_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / LOGS_DIR / call_id).mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                          "expandable_segments:True")}
    signal.signal(signal.SIGTERM, _raise_terminated)
    workers = []
    try:
        for worker_id in range(args.workers):  # they import and load while the plan is made
            log_file = open(runs_dir / LOGS_DIR / call_id / f"worker{worker_id}.log", "w")
            command = [sys.executable, str(Path(__file__).resolve()), "worker", "--config", str(args.config),
                       "--runs-dir", str(runs_dir), "--call-id", call_id, "--worker-id", str(worker_id),
                       "--workers", str(args.workers), "--threads", str(args.threads), "--deadline", str(deadline)]
            workers.append((subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                                             start_new_session=True), log_file))
        plan = make_plan(suite, cells, runs_dir)
        record = call_record(args, argv, call_id)
        record["cells_planned"] = len(plan)
        record["cells_done_before"] = sum(entry["done"] for entry in plan)
        (call_dir / "call.json").write_text(json.dumps(record, indent=2))
        atomic_write_text(json.dumps(plan, indent=1), call_dir / PLAN_FILE)
        rest = total_seconds((_estimate(e) for e in plan if not e["done"]), args.workers)
        print(f"[cl_suite] call {call_id}: {len(plan)} cells ({record['cells_done_before']} done before), "
              f"{args.workers} workers, budget {args.time_budget:.0f}s; estimate for the rest {rest:.0f}s", flush=True)
        while any(process.poll() is None for process, _ in workers) and time.time() < deadline + args.grace:
            time.sleep(2)
    except Terminated as stop:
        print(f"[cl_suite] {stop}: stopping the workers and packing what finished", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _stop(workers)
        summary = _call_summary(cells, runs_dir, call_id, time.time() - started)
        (call_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[cl_suite] {summary['cells_done']}/{summary['cells_planned']} cells done "
              f"({summary['cells_done_this_call']} in this call, {summary['cells_failed']} failed) "
              f"in {summary['wall_time_s']:.0f}s", flush=True)
        if args.pack:
            pack(runs_dir, Path(args.pack))
            print(f"[cl_suite] packed {args.pack}", flush=True)
    return 0


def _stop(workers: list) -> None:
    for process, _ in workers:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process, log_file in workers:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()


def _call_summary(cells: list[Cell], runs_dir: Path, call_id: str, wall_time_s: float) -> dict[str, Any]:
    done = [cell for cell in cells if cell.result_path(runs_dir).is_file()]
    this_call = [cell for cell in done if json.loads(cell.result_path(runs_dir).read_text())["extra"].get("call") == call_id]
    failed = [cell.key for cell in cells if cell.error_path(runs_dir).is_file() and cell not in done]
    return {"call": call_id, "cells_planned": len(cells), "cells_done": len(done), "cells_done_this_call": len(this_call),
            "cells_failed": len(failed), "failed": failed, "missing": [c.key for c in cells if c not in done],
            "wall_time_s": wall_time_s}


def pack(runs_dir: Path, archive: Path) -> Path:
    """Pack the runs dir's results, call records, logs and tuned choices (not the scratch run folders) into a
    tar.gz: a report of the archive alone names the hyper-parameters its tuned cells ran with."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name in (RESULTS_DIR, CALLS_DIR, LOGS_DIR, TUNING_FILE):
            if (runs_dir / name).exists():
                tar.add(runs_dir / name, arcname=name)
    return archive


# --------------------------------------------------------------------------- report


def collect_results(runs_dirs: Iterable[Path]) -> tuple[dict[tuple[str, str], dict[int, list[MethodResult]]], dict]:
    """Every finished cell of the runs dirs, grouped by (model, stream) and seed; the call records.

    A cell found in several runs dirs is taken from the first one that has it.
    """
    grouped: dict[tuple[str, str], dict[int, dict[str, MethodResult]]] = {}
    calls: dict[str, dict] = {}
    for runs_dir in runs_dirs:
        for path in sorted((runs_dir / CALLS_DIR).glob("*/call.json")):
            record = json.loads(path.read_text())
            calls.setdefault(record["call"], record)
        for path in sorted((runs_dir / RESULTS_DIR).rglob("seed*.json")):
            result = MethodResult.from_json(json.loads(path.read_text()))
            extra = result.extra
            by_seed = grouped.setdefault((extra["model"], extra["stream"]), {})
            by_seed.setdefault(int(extra["seed"]), {}).setdefault(result.method, result)
    return ({key: {seed: list(methods.values()) for seed, methods in sorted(seeds.items())}
             for key, seeds in grouped.items()}, calls)


def stream_header(suite: Suite, model: str, stream: str, results: list[MethodResult], calls: dict) -> dict[str, Any]:
    """The facts a stream's report starts with: model, stream, settings and the calls behind it."""
    model_spec, stream_spec = suite.models[model], suite.streams[stream]
    used_calls = sorted({result.extra.get("call") for result in results})
    records = [calls.get(call, {"call": call}) for call in used_calls]
    header = {
        "model": model_spec["label"],
        "stream": stream_spec["title"],
        "data": stream_spec.get("notes", ""),
        "loader": f"{stream_spec['loader']}({json.dumps(stream_spec.get('loader_args', {}), sort_keys=True)})",
        "settings": (f"max_length {stream_spec['max_length']}, {stream_spec.get('epochs', 1)} epoch(s) per experience, "
                     f"batch {stream_spec.get('train_mb_size', 16)}, replay budget {stream_spec['replay_buffer']} items "
                     f"(every replaying method), untuned learning rates {model_spec['learning_rates']}"),
        "seeds": ", ".join(str(s) for s in sorted({int(r.extra["seed"]) for r in results})),
    }
    for field in ("command", "commit", "device", "date", "versions"):
        header[field] = "; ".join(sorted({str(record.get(field, "unknown")) for record in records}))
    header["evaluation batch"] = evaluation_batches(results)
    header["runs sharing the device"] = ", ".join(sorted({str(r.extra.get("concurrency")) for r in results}))
    header["wall time"] = "per run, measured while that many runs shared the device"
    header["peak memory"] = ("per run: torch.cuda.max_memory_allocated on a GPU (the CUDA context not included), "
                             "the process's peak resident memory on a CPU")
    return header


def evaluation_batches(results: list[MethodResult]) -> str:
    """The evaluation batch sizes the runs scored with, and a warning where they differ: padded
    batches of other sizes round differently, which may flip a close ranking between runs."""
    sizes = {r.extra.get("eval_mb_size") for r in results}
    recorded = sorted(size for size in sizes if size is not None)
    if not recorded:
        return "not recorded"
    text = ", ".join(str(size) for size in recorded) + (" (and runs that did not record it)" if None in sizes else "")
    if len(recorded) > 1:
        text += ": WARNING, runs scored with different batch sizes are compared here"
    return text


def stream_family(suite: Suite, model: str, stream: str) -> Family | None:
    """The protocol table a (model, stream) report belongs to (the first one, in config order)."""
    return next((family for family in suite.families
                 if stream in family.streams and model in suite.plans[family.plan]["models"]), None)


def protocol_header(suite: Suite, family: Family | None, stream: str, tuning: dict | None) -> dict[str, str]:
    """The protocol facts a stream's report carries: its table, reference, contrasts, data seed, tuning."""
    header = {"data seed": f"{suite.stream_data_seed(stream)} (draws the items; the training seeds do not change them)"}
    if family is not None:
        header["protocol table"] = f"{family.table} (plan {family.plan}; streams {', '.join(family.streams)})"
        header["reference of every difference"] = family.reference
        header["primary contrasts"] = "; ".join(f"{c.method} minus {c.reference}: {c.claim}" for c in family.contrasts)
    header["hyper-parameters"] = (
        "chosen per method on the development stream's validation split, grids and choices in protocol.json"
        if tuning else "the config's values (no tuning.json in the runs dirs)")
    return header


def report_main(args: argparse.Namespace) -> int:
    """Write one report folder per (model, stream), and the protocol with its contrasts, from the merged runs dirs."""
    suite = Suite.load(args.config)
    runs_dirs = [Path(d) for d in args.runs_dir]
    grouped, calls = collect_results(runs_dirs)
    if not grouped:
        raise SystemExit(f"no finished cells under {args.runs_dir}")
    tuning = next((json.loads((d / TUNING_FILE).read_text()) for d in runs_dirs if (d / TUNING_FILE).is_file()), None)
    out = Path(args.out)
    index = [f"# Continual-learning benchmark results ({suite.config.get('name', 'cl_suite')})", ""]
    order = {method: index for index, method in enumerate(suite.methods)}  # table rows in the config's order
    runs_by_stream: dict[tuple[str, str], dict[str, dict[int, MethodResult]]] = {}
    for (model, stream), by_seed in sorted(grouped.items()):
        if suite.streams[stream].get("loader_args", {}).get("development"):
            continue  # chooses hyper-parameters; never reported
        results_by_seed = [sorted(results, key=lambda r: order.get(r.extra.get("suite_method", r.method), len(order)))
                           for results in by_seed.values()]
        flat = [result for results in results_by_seed for result in results]
        for result in flat:
            by_method = runs_by_stream.setdefault((model, stream), {})
            by_method.setdefault(result.method, {})[int(result.extra["seed"])] = result
        family = stream_family(suite, model, stream)
        seeds = {method: set(by_seed) for method, by_seed in runs_by_stream[(model, stream)].items()}
        # differences pair every method with the reference seed by seed: none until all ran the same seeds
        same_seeds = len({frozenset(s) for s in seeds.values()}) == 1
        reference = family.reference if family and same_seeds and family.reference in seeds else None
        candidates = sorted({r.method for r in flat if "MetaKVConsolidation" in r.extra.get("strategy", "")})
        title = f"{suite.models[model]['title']}: {suite.streams[stream]['title']}"
        header = {**stream_header(suite, model, stream, flat, calls), **protocol_header(suite, family, stream, tuning)}
        paths = write_seed_report(results_by_seed, out / model / stream, title=title, header=header,
                                  candidates=candidates, reference=reference)
        index.append(f"- [{title}]({paths['markdown'].relative_to(out)})")
        print(f"[cl_suite] {paths['markdown']}")
    contrasts = []
    for family in suite.families:
        suffix = ".fixed-compute" if suite.plans[family.plan].get("compute") == "fixed" else ""
        for model in suite.plans[family.plan]["models"]:
            runs = {stream: methods for (m, stream), methods in runs_by_stream.items() if m == model}
            contrasts += [{"model": model, **entry}
                          for entry in contrast_differences(family, runs, label=lambda method: method + suffix)]
    grids = suite.tuning.get("grids", {})
    literature = [literature_comparison(anchor, {stream: methods for (m, stream), methods in runs_by_stream.items()
                                                 if m == model})
                  for anchor in suite.literature for model in suite.plans[anchor.plan]["models"]]
    protocol = {"families": [family.to_json() for family in suite.families], "data_seed": suite.data_seed,
                "seeds": suite.seeds, "schedules": suite.schedules, "grids": grids, "tuning": tuning,
                "contrasts": contrasts, "literature": literature}
    atomic_write_text(json_text(protocol), out / "protocol.json")
    index += ["", "## Primary contrasts", "",
              "Declared in the suite config before any run. Paired bootstrap over seeds and test items; p-values "
              "Holm-adjusted across the streams of each contrast, per figure (protocol.json).", "",
              *contrast_markdown(contrasts),
              *literature_markdown(literature),
              "## Hyper-parameters", "",
              "Each method's grid (the same size for every method), scored on the development stream's validation "
              "split; the chosen point ran on every reported stream.", "",
              *tuning_markdown(tuning, grids)]
    (out / "INDEX.md").write_text("\n".join(index) + "\n")
    if args.readme:
        readme = Path(args.readme)
        folder = os.path.relpath(out.resolve(), readme.resolve().parent)
        readme.write_text(replace_generated_block(readme.read_text(), README_BLOCK, readme_contrasts(protocol, folder)))
        print(f"[cl_suite] {readme}: the '{README_BLOCK}' block")
    return 0


def tune_main(args: argparse.Namespace) -> int:
    """Pick each method's grid point from the tuning plans' finished cells; write the choices as JSON."""
    suite = Suite.load(args.config)
    tuning_plans = [name for name, plan in suite.plans.items() if plan.get("tune")]
    if not tuning_plans:
        raise SystemExit(f"{suite.source}: no plan has tune: true")
    runs: dict[str, dict[str, dict[int, dict[int, MethodResult]]]] = {}  # model, method, grid point, seed
    for runs_dir in (Path(d) for d in args.runs_dir):
        for path in sorted((runs_dir / RESULTS_DIR).rglob("seed*.json")):
            result = MethodResult.from_json(json.loads(path.read_text()))
            extra = result.extra
            if extra.get("plan") in tuning_plans:
                by_point = runs.setdefault(extra["model"], {}).setdefault(extra["suite_method"], {})
                by_point.setdefault(int(extra["grid_point"]), {}).setdefault(int(extra["seed"]), result)
    if not runs:
        raise SystemExit(f"no finished tuning cells (plans {tuning_plans}) under {args.runs_dir}")
    chosen = {model: select_points({method: {point: list(by_seed.values()) for point, by_seed in by_point.items()}
                                    for method, by_point in by_method.items()}, suite.tuning["grids"])
              for model, by_method in runs.items()}
    streams = {name: suite.plans[name]["streams"] for name in tuning_plans}
    out = Path(args.out or Path(args.runs_dir[0]) / TUNING_FILE)
    record = {"development_streams": streams, "grids": suite.tuning["grids"], "chosen": chosen}
    atomic_write_text(json_text(record), out)
    for model, methods in chosen.items():
        for method, choice in methods.items():
            print(f"[cl_suite] {model} {method}: {choice['chosen']} "
                  f"(point {choice['chosen_index']} of {len(choice['grid'])})")
    print(f"[cl_suite] wrote {out}")
    return 0


def plan_main(args: argparse.Namespace) -> int:
    """Print the cells, their estimates and the total device time."""
    suite = Suite.load(args.config)
    plan = make_plan(suite, suite.cells(args.plans, args.methods, args.streams), Path(args.runs_dir))
    todo = [entry for entry in plan if not entry["done"]]
    print(f"{'':4} {'priority':8} {'cell':66} {'device s':>9} {'host s':>7} {'measured':>8}")
    for entry in plan:
        print(f"{'done' if entry['done'] else '':4} {entry['priority']:<8} {entry['key']:66} "
              f"{entry['device_s']:9.1f} {entry['host_s']:7.1f} {entry['measured_cells'] or '':>8}")
    by_plan: dict[str, list[Estimate]] = {}
    for entry in todo:
        by_plan.setdefault(entry["plan"], []).append(_estimate(entry))
    for name, estimates in by_plan.items():
        print(f"plan {name}: {len(estimates)} cells, {sum(e.device_s for e in estimates):.0f} device-s, "
              f"~{total_seconds(estimates, args.workers):.0f}s wall with {args.workers} workers")
    total = total_seconds((_estimate(e) for e in todo), args.workers)
    print(f"{len(todo)} of {len(plan)} cells to run: about {total:.0f}s ({total / 60:.1f} min) of wall time with "
          f"{args.workers} workers at the config's throughput and the finished cells' wall times")
    return 0


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub, runs_dirs: bool = False):
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="suite config (YAML)")
        if runs_dirs:
            sub.add_argument("--runs-dir", nargs="+", default=["runs/cl_suite"], help="runs folders to merge")
        else:
            sub.add_argument("--runs-dir", default="runs/cl_suite", help="where results, claims and logs go")
        return sub

    plan = common(commands.add_parser("plan", help="list the cells and the estimated device time"))
    plan.add_argument("--plans", nargs="*", help="plans to include (default: all)")
    plan.add_argument("--methods", nargs="*", help="only these methods of the plans (default: all)")
    plan.add_argument("--streams", nargs="*", help="only these streams of the plans (default: all)")
    plan.add_argument("--workers", type=int, default=8, help="parallel workers the estimate assumes")
    run = common(commands.add_parser("run", help="run the cells with parallel workers"))
    run.add_argument("--plans", nargs="*", help="plans to run (default: all)")
    run.add_argument("--methods", nargs="*", help="only these methods of the plans (default: all)")
    run.add_argument("--streams", nargs="*", help="only these streams of the plans (default: all)")
    run.add_argument("--workers", type=int, default=8, help="parallel worker processes on the device")
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    run.add_argument("--time-budget", type=float, default=480.0, help="seconds until the workers are stopped")
    run.add_argument("--grace", type=float, default=0.0, help="extra seconds a running cell may use past the budget")
    run.add_argument("--pack", help="write results, call records and logs into this tar.gz at the end")
    run.add_argument("--commit", help="the commit being run (default: git rev-parse HEAD)")
    run.add_argument("--call-id", help="this call's id (default: the start time)")
    report = common(commands.add_parser("report", help="write per-stream tables, JSON and plots"), runs_dirs=True)
    report.add_argument("--out", default="benchmarks/results/cl_suite", help="results folder")
    report.add_argument("--readme", help="also rewrite the page's generated block of primary contrasts (README.md)")
    tune = common(commands.add_parser("tune", help="choose each method's grid point from the tuning plans' cells"),
                  runs_dirs=True)
    tune.add_argument("--out", help=f"the choices (default: the first runs dir's {TUNING_FILE}, which run reads)")
    worker = common(commands.add_parser("worker", help=argparse.SUPPRESS))
    worker.add_argument("--call-id", required=True)
    worker.add_argument("--worker-id", type=int, required=True)
    worker.add_argument("--workers", type=int, required=True)
    worker.add_argument("--threads", type=int, default=1)
    worker.add_argument("--deadline", type=float, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if args.command == "worker":
        return worker_main(args)
    if args.command == "run":
        return run_main(args, argv)
    if args.command == "report":
        return report_main(args)
    if args.command == "tune":
        return tune_main(args)
    return plan_main(args)


if __name__ == "__main__":
    sys.exit(main())
