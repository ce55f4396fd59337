"""Running a whole stream with one strategy, checkpointing it, resuming it, comparing strategies.

:func:`run_stream` is the loop every entry point uses (``metakv-cl fit`` and ``compare``)::

    row 0  = strategy.eval(test_stream)          # before any training
    for k in experiences:
        strategy.train(train_stream[k])          # one or more Lightning fits
        row k+1 = strategy.eval(test_stream)
        save the stream state                     # model, strategy state, rows, RNG, next k

The stream state lives in ``<root_dir>/stream_state/``: ``state.safetensors`` (model weights
including Meta-KV and adapters, the strategy's state such as replay buffer, Fisher or M history,
the rows of R and the per-item outcomes of their evaluations, RNG states, the index of the next
experience: tensors as tensors, the rest as
JSON in the header, so loading it never runs code), ``result.json`` (the rows so far as a
:class:`~metakv_cl.report.MethodResult`) and ``progress.json`` (human-readable progress). Inside
an experience every fit writes ``last.ckpt`` at each epoch end. ``run_stream(...,
resume=True)`` (the CLI's ``--ckpt_path last``) restores the stream state, continues the
interrupted experience from its ``last.ckpt`` files and never redoes finished experiences.
Benchmark sweeps that rerun an interrupted run from its start pass ``save_weights=False``: only
``result.json`` and ``progress.json`` are written (no half-gigabyte state file per experience).

Every result's ``extra`` holds ``module`` (the settings of the module the strategy trained,
:meth:`~metakv_cl.training.module.ContinualLMModule.settings`), ``wall_time_s``,
``peak_memory_bytes`` (peak CUDA memory of this run when it ran on a GPU, else the process's
peak resident memory), ``device``, the strategy's
``trainable_params`` and its training throughput: ``train_tokens``, ``train_seconds`` and
``train_tokens_per_s`` (all ranks' tokens over the training batches' time).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import resource
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from metakv_cl.data.stream import LMBenchmark, concat_experience_datasets
from metakv_cl.report import MethodResult, format_table, format_task_table, item_outcomes, json_text, write_report
from metakv_cl.training.callbacks import derived_seed, seed_all
from metakv_cl.training.passes import is_global_zero
from metakv_cl.runfolder import (
    RunFolderError,
    atomic_write_text,
    check_folder_name,
    load_state_file,
    remove_tree,
    save_state_file,
    settings_key,
)

log = logging.getLogger(__name__)

STATE_DIR = "stream_state"
STATE_FORMAT = 3  # 3: method plugins keep their own state
# the pickle file of format 1, never loaded: unpickling a file from a shared folder can run code
_PICKLED_STATE = "state.pt"


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _peak_memory_bytes() -> int:
    """Peak accelerator memory if CUDA is in use, otherwise the process's peak resident memory."""
    if _cuda_in_use():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _device_name() -> str:
    return torch.cuda.get_device_name() if _cuda_in_use() else "cpu"


class StreamState:
    """Reads and writes the stream state of one method's run under ``<root_dir>/stream_state/``.

    Args:
        root_dir: the method's run folder.
    """

    def __init__(self, root_dir: str | Path, save_weights: bool = True):
        self.folder = Path(root_dir) / STATE_DIR
        self.path = self.folder / "state.safetensors"
        self.save_weights = save_weights

    def exists(self) -> bool:
        """Whether there is a state to resume from (a format-1 pickle counts: loading refuses it)."""
        return self.path.is_file() or (self.folder / _PICKLED_STATE).is_file()

    def save(self, strategy, benchmark: LMBenchmark, rows: list[list[float]], evaluations: list[list[dict]] | None,
             next_experience: int, wall_time_s: float, extra: dict[str, Any]) -> None:
        """Write the state (rank 0 only; other ranks return at once); without ``save_weights``
        only the result and the progress files. ``evaluations``: each row's per-item outcomes
        (None when a resumed state had none)."""
        if not is_global_zero():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.save_weights:
            self._save_weights(strategy, benchmark, rows, evaluations, next_experience, wall_time_s, extra)
        partial = _method_result(strategy, benchmark, rows, evaluations, extra)
        atomic_write_text(json_text(partial.to_json()), self.folder / "result.json")
        progress = {
            "method": strategy.method_name,
            "next_experience": next_experience,
            "num_experiences": benchmark.num_experiences,
            "fingerprint": benchmark.fingerprint(),
        }
        atomic_write_text(json.dumps(progress, indent=2) + "\n", self.folder / "progress.json")

    def _save_weights(self, strategy, benchmark: LMBenchmark, rows: list[list[float]],
                      evaluations: list[list[dict]] | None, next_experience: int, wall_time_s: float,
                      extra: dict[str, Any]) -> None:
        state = {
            "format": STATE_FORMAT,
            "method": strategy.method_name,
            "fingerprint": benchmark.fingerprint(),
            "next_experience": next_experience,
            "rows": rows,
            "evaluations": evaluations,
            "eval_results": strategy.eval_results,
            "module": strategy.module.state_dict(),
            "strategy": strategy.state_dict(),
            "rng": _rng_state(),
            "wall_time_s": wall_time_s,
            "extra": extra,
        }
        save_state_file(state, self.path)

    def load(self, strategy, benchmark: LMBenchmark) -> dict[str, Any]:
        """Restore strategy, weights and RNG from the state; returns the state dict.

        Raises:
            FileNotFoundError: no state. ValueError: the state belongs to another stream or method.
            RunFolderError: the state is a pickle, truncated or corrupt.
        """
        if not self.path.is_file():
            pickled = self.folder / _PICKLED_STATE
            if pickled.is_file():
                raise RunFolderError(
                    f"{pickled} is a pickle stream state (format 1), which is not loaded because unpickling "
                    "can run code; rerun the stream, or convert it once from a trusted source"
                )
            raise FileNotFoundError(f"no stream state to resume from: {self.path}")
        state = load_state_file(self.path)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise ValueError(f"{self.path}: unsupported stream-state format {found!r} (expected {STATE_FORMAT})")
        if state["fingerprint"] != benchmark.fingerprint():
            raise ValueError(
                f"{self.path} was written for a different stream (fingerprint {state['fingerprint']} vs "
                f"{benchmark.fingerprint()}): the data config changed; use a new default_root_dir"
            )
        if state["method"] != strategy.method_name:
            raise ValueError(
                f"{self.path} belongs to method {state['method']!r}, not {strategy.method_name!r}; "
                "use a new default_root_dir or the same strategy"
            )
        strategy.load_state_dict(state["strategy"])  # rebuilds adapters etc. before the weights load
        strategy.module.load_state_dict(state["module"])
        strategy.eval_results = dict(state["eval_results"])
        _set_rng_state(state["rng"])
        return state


def _evaluate_row(strategy, benchmark: LMBenchmark) -> tuple[list[float], list[dict]]:
    """One row of R and the per-item outcomes of its evaluations."""
    strategy.eval_scores = {}
    strategy.eval(benchmark.test_stream)
    experiences = range(benchmark.num_experiences)
    return [float(strategy.eval_scores[j]) for j in experiences], [strategy.eval_items[j] for j in experiences]


def _method_result(strategy, benchmark: LMBenchmark, rows: list[list[float]], evaluations: list[list[dict]] | None,
                   extra: dict[str, Any]) -> MethodResult:
    items = item_outcomes(benchmark.score_name, evaluations) if evaluations is not None else None
    return MethodResult(strategy.method_name, benchmark.experience_names, benchmark.score_name, rows, extra, items)


def run_stream(
    strategy,
    benchmark: LMBenchmark,
    *,
    root_dir: str | Path | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    save_weights: bool = True,
    echo: Callable[[str], None] | None = None,
) -> MethodResult:
    """Train and evaluate ``strategy`` on the whole stream, checkpointing after every experience.

    Args:
        strategy: a :class:`~metakv_cl.strategies.base.ContinualStrategy`.
        benchmark: the :class:`~metakv_cl.data.stream.LMBenchmark`.
        root_dir: the method's run folder (default: ``strategy.root_dir``).
        resume: continue from ``<root_dir>/stream_state`` and the interrupted experience's
            ``last.ckpt`` files (starts from scratch when there is no state yet).
        keep_checkpoints: keep each finished experience's per-epoch checkpoints (by default
            they are deleted once the stream state covers the experience).
        save_weights: write the state file (weights and strategy state) after every experience;
            False keeps only the rows of R (a later ``resume`` then starts from the beginning).
        echo: called with one progress line per experience (rank 0 only); default: logging.

    Returns:
        The :class:`~metakv_cl.report.MethodResult` (matrix R with T + 1 rows, the per-item outcomes
        of every evaluation).
    """
    echo = echo or log.info
    root = Path(root_dir) if root_dir is not None else strategy.root_dir
    strategy.root_dir = root
    strategy.experience_names = benchmark.experience_names
    store = StreamState(root, save_weights=save_weights)
    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier run's in the same process
    started = time.perf_counter()
    extra: dict[str, Any] = {
        "seed": strategy.seed,
        "strategy": type(strategy).__name__,
        "module": strategy.module.settings(),
    }
    resumed_at: int | None = None
    if resume and store.exists():
        state = store.load(strategy, benchmark)
        rows, next_experience = [list(row) for row in state["rows"]], int(state["next_experience"])
        evaluations = state.get("evaluations")  # None in states saved before per-item outcomes were kept
        elapsed_before = float(state["wall_time_s"])
        extra.update(state["extra"])
        resumed_at = next_experience
        if is_global_zero():
            echo(f"[{strategy.method_name}] resumed at experience {next_experience} from {store.path}")
    else:
        if resume and is_global_zero():
            echo(f"[{strategy.method_name}] no stream state under {root}; starting from the beginning")
        seed_all(derived_seed(strategy.seed, "stream"))
        row, evaluated = _evaluate_row(strategy, benchmark)
        rows, evaluations, next_experience, elapsed_before = [row], [evaluated], 0, 0.0
        store.save(strategy, benchmark, rows, evaluations, 0, elapsed_before, extra)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    total = benchmark.num_experiences
    schedule = (
        [list(range(total))] if getattr(strategy, "trains_jointly", False) else [[k] for k in range(total)]
    )
    for experiences in schedule:
        if experiences[-1] < next_experience:
            continue
        strategy.resume_phases = resumed_at is not None and experiences[-1] >= resumed_at
        step_started = time.perf_counter()
        if len(experiences) == 1:
            strategy.train(benchmark.train_stream[experiences[0]], eval_streams=[])
        else:
            strategy.train_jointly([benchmark.train_stream[k] for k in experiences])
        row, evaluated = _evaluate_row(strategy, benchmark)
        rows.extend([row] * len(experiences))  # joint training: one model stands for every row
        if evaluations is not None:
            evaluations.extend([evaluated] * len(experiences))
        next_experience = experiences[-1] + 1
        extra.update(strategy.report_extra())
        extra["wall_time_s"] = elapsed()
        extra["peak_memory_bytes"] = max(_peak_memory_bytes(), int(extra.get("peak_memory_bytes", 0)))
        extra["device"] = _device_name()
        store.save(strategy, benchmark, rows, evaluations, next_experience, elapsed(), extra)
        if is_global_zero():
            names = ", ".join(benchmark.experience_names[k] for k in experiences)
            scores = " ".join(f"{value:.3f}" for value in row)
            echo(
                f"[{strategy.method_name}] trained {names} ({next_experience}/{total}) in "
                f"{time.perf_counter() - step_started:.1f}s; {benchmark.score_name} per experience: {scores}"
            )
            if not keep_checkpoints:
                remove_tree(strategy.stage_dir(), root)
        strategy.resume_phases = False
    extra["wall_time_s"] = elapsed()
    extra.setdefault("peak_memory_bytes", _peak_memory_bytes())
    extra.setdefault("device", _device_name())
    if is_global_zero() and not keep_checkpoints:
        _remove_if_empty(root / "experiences")
    return _method_result(strategy, benchmark, rows, evaluations, extra)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def warm_up(
    module,
    benchmark: LMBenchmark,
    *,
    root_dir: str | Path,
    epochs: int,
    trainer_kwargs: dict[str, Any] | None = None,
    train_mb_size: int = 8,
    seed: int = 0,
    resume: bool = True,
    echo: Callable[[str], None] | None = None,
) -> bool:
    """Pre-train ``module`` on the benchmark's warm-up stream (all parameters, plain LM loss).

    The weights are cached in ``<root_dir>/warmup/<key>/weights.safetensors``, ``key`` a hash of
    everything the warm-up result depends on (initial weights, optimiser settings, warm-up
    stream, epochs, batch size, seed, Trainer arguments): a later call with the same settings
    (another strategy of a comparison, or a resumed run) loads them instead of training again,
    one with other settings trains its own.

    Args:
        module: the :class:`~metakv_cl.training.module.ContinualLMModule`.
        benchmark: a benchmark with a ``warmup_stream``.
        root_dir: run folder.
        epochs: warm-up epochs (0: nothing to do).
        trainer_kwargs: Trainer arguments (``max_epochs`` is replaced by ``epochs``).
        train_mb_size: mini-batch size.
        seed: seed.
        resume: continue an interrupted warm-up from its ``last.ckpt``.
        echo: progress line sink.

    Returns:
        True if warm-up weights are in place (trained or loaded), False if there is no warm-up.
    """
    from metakv_cl.strategies.base import ContinualStrategy

    echo = echo or log.info
    if epochs <= 0 or "warmup" not in benchmark.streams:
        return False
    folder = Path(root_dir) / "warmup" / _warm_up_key(module, benchmark, epochs, trainer_kwargs, train_mb_size, seed)
    weights = folder / "weights.safetensors"
    if weights.is_file():
        module.load_state_dict(load_state_file(weights))
        return True
    kwargs = {**(trainer_kwargs or {}), "default_root_dir": str(folder)}
    trainer = ContinualStrategy(
        module=module, trainer_kwargs=kwargs, train_mb_size=train_mb_size, seed=seed, name="warmup", root_dir=folder
    )
    trainer.stage = "warmup"
    trainer.resume_phases = resume
    started = time.perf_counter()
    dataset = concat_experience_datasets(experience.dataset for experience in benchmark.warmup_stream)
    trainer.module.experience_label = "the warm-up stream"
    trainer.fit_phase("train", dataset, max_epochs=epochs)
    if is_global_zero():
        save_state_file(module.state_dict(), weights)
        remove_tree(folder / "experiences", folder)
        echo(f"[warm-up] {len(dataset)} items x {epochs} epochs in {time.perf_counter() - started:.1f}s")
    return True


# Trainer arguments that change how a run looks or where it writes, not what it computes.
PRESENTATION_TRAINER_KEYS = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "logger",
                             "log_every_n_steps")


def _plain_attributes(obj: Any) -> dict[str, Any]:
    return {key: value for key, value in sorted(vars(obj).items())
            if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))}


def _warm_up_key(module, benchmark: LMBenchmark, epochs: int, trainer_kwargs: dict[str, Any] | None,
                 train_mb_size: int, seed: int) -> str:
    trainer = {key: value for key, value in (trainer_kwargs or {}).items() if key not in PRESENTATION_TRAINER_KEYS}
    callbacks = trainer.pop("callbacks", None) or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    optimizer = ("lr", "weight_decay", "betas", "lr_schedule", "warmup_steps")
    settings = {
        "stream": benchmark.fingerprint(),
        "epochs": epochs,
        "train_mb_size": train_mb_size,
        "seed": seed,
        "trainer": trainer,
        # instances have no stable repr: their class and plain settings (EarlyStopping's patience, ...)
        "callbacks": [[type(callback).__qualname__, _plain_attributes(callback)] for callback in callbacks],
        "optimizer": [getattr(module, name, None) for name in optimizer],
        "module": dict(getattr(module, "hparams", {})),  # attn_implementation, dtype, Meta-KV config, ...
    }
    return settings_key(settings, module.state_dict())


def compare(
    strategy_factories: Sequence[Callable[[Any], Any]],
    module,
    benchmark: LMBenchmark,
    *,
    root_dir: str | Path,
    resume: bool = False,
    keep_checkpoints: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[MethodResult]:
    """Run several strategies on the same stream, each from a fresh copy of its initial module.

    Each factory receives a deep copy of its module and returns a strategy; its run goes to
    ``<root_dir>/<method name>/``. The side-by-side report is written to ``root_dir``.

    Args:
        strategy_factories: callables ``module -> strategy``.
        module: the initial model (after any warm-up) of every strategy, or a list with one
            initial model per factory (a model may be listed several times); copied, never trained.
        benchmark: the stream.
        root_dir: the comparison folder.
        resume: resume every method from its stream state (finished methods are not rerun).
        keep_checkpoints: see :func:`run_stream`.
        echo: progress line sink.

    Returns:
        One :class:`~metakv_cl.report.MethodResult` per strategy.

    Raises:
        ValueError: two strategies share a method name, a name is not a plain folder name, or the
            list of modules is not as long as the list of factories (checked before anything trains).
    """
    root = Path(root_dir)
    modules = list(module) if isinstance(module, (list, tuple)) else [module] * len(strategy_factories)
    if len(modules) != len(strategy_factories):
        raise ValueError(f"compare: {len(modules)} modules for {len(strategy_factories)} strategies; give one per strategy")
    # names first (strategy constructors leave the model alone), so a clash fails before any training;
    # each name becomes a folder that run_stream fills and prunes, so it must stay inside root
    names = [
        check_folder_name(factory(initial).method_name, "strategy name")
        for factory, initial in zip(strategy_factories, modules)
    ]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"several strategies are named {clashes}; give them distinct init_args.name values")
    results = []
    initial_states = {id(initial): copy.deepcopy(initial.state_dict()) for initial in modules}
    for factory, initial in zip(strategy_factories, modules):
        candidate = copy.deepcopy(initial)
        candidate.load_state_dict(initial_states[id(initial)])
        strategy = factory(candidate)
        results.append(
            run_stream(
                strategy,
                benchmark,
                root_dir=root / strategy.method_name,
                resume=resume,
                keep_checkpoints=keep_checkpoints,
                echo=echo,
            )
        )
    return results


def finish_report(results: list[MethodResult], root_dir: str | Path, echo: Callable[[str], None] = print) -> str:
    """Write the report files (rank 0) and return the printed table.

    Args:
        results: the methods' results.
        root_dir: where ``report.json``, ``report.md`` and the plots go.
        echo: where the table is printed.

    Returns:
        The Markdown table (with its footnotes), then the per-experience table of accuracy results.
    """
    table = "\n\n".join(part for part in (format_table(results), format_task_table(results)) if part)
    if is_global_zero():
        paths = write_report(results, root_dir)
        echo(table)
        echo(f"report: {paths['markdown']}")
    return table
