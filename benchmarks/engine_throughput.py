"""Training throughput of the engine against a bare PyTorch loop: same model, same batches, one process.

Paths, each training the same stream of language-modelling experiences from the same initial
weights on the same mini-batches of documents (the engine's own loader and seeds):

* ``bare padded``: a plain loop (forward, token-mean cross-entropy, backward, AdamW) over padded
  batches, eager (compiled with ``--compile --layout padded``, where it is the reference);
* ``bare packed``: the same loop over the same documents packed into rows of ``--pack-length``
  tokens (:mod:`metakv_cl.training.packing`), its transformer blocks compiled with ``--compile``
  the way the engine compiles them (:mod:`metakv_cl.training.compilation`);
* ``engine <preset>``: ``metakv-cl``'s strategies (``strategy.train(experience)``, Lightning
  underneath), one per preset of :data:`PRESETS`, in the ``--layout`` of the reference.

With ``--compile`` the bare loops compile as the engine does: the blocks and the loss over the
logits, nothing else. With ``--eval-batch-size N`` the run also times the engine's evaluation
(``strategy.eval`` of every experience, batches of N documents, end to end: Lightning's validate
calls included) over the same documents, as scored tokens per second.

The reference is the bare loop in the engine's layout (``bare packed`` by default). Every path is
timed by the same clock: from the start of a fit's ``--skip-steps + 1``-th batch to the end of its
last (the device synchronised at both ends; Lightning's set-up, checkpoints and validation fall
outside), over the documents' tokens (no padding). Paths run interleaved, ``--rounds`` times;
tables report the median tokens/s of each path and its ratio to the reference.

    python benchmarks/engine_throughput.py --out benchmarks/results/engine_throughput_cpu        # CPU, ~2 min
    python benchmarks/engine_throughput.py --model smollm2-135m --data dbpedia --layout padded \\
        --presets naive --batch-size 8 --max-length 64 --documents 24 --threads 1 --out benchmarks/results/engine_throughput_cpu_smollm2
    python benchmarks/engine_throughput.py --device cuda --model smollm2-shape --vocab-size 50304 \\
        --data dbpedia --precision bf16 --compile --batch-size 112 --max-length 256 --pack-length 1024 \\
        --experiences 6 --documents 400 --skip-steps 1 --rounds 2 --warmup-rounds 1 --eval-batch-size 128 \\
        --out benchmarks/results/engine_throughput

Every path run also records its wall time (the whole path: Lightning's set-up, compilation, untimed
batches, evaluation) beside its timed seconds, on the console and in the results. ``--out STEM``
writes ``STEM.json`` (the command, commit, device, library versions, settings and every path run)
and ``STEM.md``, rendered from that JSON by :func:`render_markdown`, after every path run, so a run
that is killed keeps what it measured; ``complete`` and ``progress`` say how far it got, and the
page of a partial run says so. ``--time-budget SECONDS`` stops the run cleanly, partial, before a
path whose last wall time would take it past SECONDS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from time import monotonic as wall_clock  # whole paths and --time-budget; a name of its own, so tests can advance it
from typing import Any, Callable, Iterable

import torch

import metakv_cl  # noqa: F401  (torchvision import fix before lightning loads)
import pytorch_lightning as pl
import transformers
from metakv_cl.data.stream import CompactVocabulary, LMBenchmark, make_benchmark
from metakv_cl.data.tasks import TextTask
from metakv_cl.hub import load_causal_lm, load_tokenizer
from metakv_cl.modeling import MetaKVConfig
from metakv_cl.runfolder import atomic_write_text
from metakv_cl.strategies import strategy_class
from metakv_cl.training.callbacks import derived_seed
from metakv_cl.training.compilation import BlockCompiler
from metakv_cl.training.datamodule import TrainingDataModule
from metakv_cl.training.module import ContinualLMModule, token_nll
from metakv_cl.training.packing import model_inputs

# preset -> (registered strategy name, its init arguments, whether the model carries Meta-KV)
PRESETS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "naive": ("naive", {}, False),
    "ewc": ("ewc", {"mode": "online", "ewc_lambda": 1e4, "fisher_batches": 2}, False),
    "replay": ("replay", {"buffer_size": 16}, False),
    "lora": ("lora", {"mode": "shared"}, False),
    "metakv": ("metakv", {"mode": "replay", "buffer_size": 16, "validation_fraction": 0.2}, True),
}
META_KV = MetaKVConfig(source="consolidated", rank=8)

# name -> (architecture, config overrides, tokenizer); "smollm2-135m" is the pretrained model.
MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "tiny": ("gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                      "attn_pdrop": 0.0}, "gpt2"),
    "smollm2-shape": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                                "tie_word_embeddings": True}, "gpt2"),
    "smollm2-135m": ("smollm2-135m", {}, "smollm2-135m"),
}
BARE_PADDED, BARE_PACKED, EVALUATION = "bare padded", "bare packed", "engine evaluation"


class Stopwatch:
    """Seconds and tokens of the timed stretches of training, the device synchronised at each edge.

    Tokens accumulate on the device and are read once, in :attr:`token_count`, so timing adds no
    host synchronisation inside a stretch.

    Args:
        device: the device the steps run on.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._tokens: torch.Tensor | int = 0
        self._since: float | None = None

    @property
    def running(self) -> bool:
        return self._since is not None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += self._now() - self._since
            self._since = None

    def count(self, tokens: torch.Tensor | int) -> None:
        """Add tokens to the stretch's tally (a tensor stays on the device until :attr:`token_count`)."""
        self._tokens = self._tokens + tokens

    @property
    def token_count(self) -> int:
        return int(self._tokens)

    @property
    def tokens_per_second(self) -> float:
        if self.seconds <= 0:
            raise ValueError("no timed step: give more documents per experience than --skip-steps batches")
        return self.token_count / self.seconds


class EngineClock(pl.Callback):
    """A :class:`Stopwatch` over the engine's training batches, skipping each fit's first ``skip``.

    Args:
        stopwatch: the stopwatch to run.
        skip: untimed batches at the start of every fit (compilation, first allocations).
    """

    def __init__(self, stopwatch: Stopwatch, skip: int):
        self.stopwatch, self.skip = stopwatch, skip
        self._batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._batches >= self.skip:
            self.stopwatch.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.stopwatch.running:
            self.stopwatch.count(batch["attention_mask"].sum())
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stopwatch.stop()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.stopwatch.stop()

    def on_train_end(self, trainer, pl_module) -> None:
        self.stopwatch.stop()


def training_batches(dataset, args: argparse.Namespace, experience: int, packed: bool) -> Iterable[dict]:
    """The batches the engine's single ``"train"`` fit of ``experience`` draws (same loader, same seed)."""
    stage = f"exp_{experience:03d}"  # ContinualStrategy.stage_for
    data = TrainingDataModule(dataset, batch_size=args.batch_size, seed=derived_seed(args.seed, stage, "train"),
                              pack_length=args.pack_length if packed else None)
    return data.train_dataloader()


def bare_loop(model: torch.nn.Module, benchmark: LMBenchmark, args: argparse.Namespace, packed: bool,
              stopwatch: Stopwatch) -> None:
    """Train ``model`` on every experience with a plain PyTorch loop, timed like the engine."""
    device = stopwatch.device
    model.to(device).train()
    # the reference (the bare loop in the engine's layout) compiles whenever the engine does
    compiled = args.compile and (packed or args.layout == "padded")
    blocks = BlockCompiler() if compiled else None  # the engine's compilation, without the engine
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    # as Lightning's bf16-mixed autocasts (no weight cache), so both paths run the same kernels
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if args.precision == "bf16"
                else contextlib.nullcontext())
    for index, experience in enumerate(benchmark.train_stream):
        for step, batch in enumerate(training_batches(experience.dataset, args, index, packed)):
            if step >= args.skip_steps:
                stopwatch.start()
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            with autocast, blocks.active(model) if blocks else contextlib.nullcontext():
                outputs = model(**model_inputs(batch))
            nll, count = (blocks.compiled(token_nll) if blocks else token_nll)(outputs.logits, batch["labels"])  # the engine's loss
            loss = nll.sum() / count.sum().clamp_min(1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if stopwatch.running:
                stopwatch.count(batch["attention_mask"].sum())
        stopwatch.stop()


def engine_trainer_kwargs(args: argparse.Namespace, device: torch.device, **extra: Any) -> dict[str, Any]:
    """The Trainer arguments of every engine path: one device, resident model, ``--precision``, quiet."""
    return dict(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        strategy="single_device_resident",
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        **extra,
    )


def engine_run(model: torch.nn.Module, benchmark: LMBenchmark, args: argparse.Namespace, preset: str,
               stopwatch: Stopwatch, root: Path) -> None:
    """Train ``model`` on every experience through the engine's strategy ``preset``."""
    name, init_args, uses_meta_kv = PRESETS[preset]
    module = ContinualLMModule(model, lr=args.lr, compile=args.compile, meta_kv=META_KV if uses_meta_kv else None)
    strategy = strategy_class(name)(
        **init_args,
        module=module,
        train_mb_size=args.batch_size,
        train_pack_length=args.pack_length if args.layout == "packed" else None,
        seed=args.seed,
        trainer_kwargs=engine_trainer_kwargs(args, stopwatch.device, max_epochs=1, enable_checkpointing=False,
                                             callbacks=[EngineClock(stopwatch, args.skip_steps)]),
        root_dir=root / preset,
    )
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[])


def engine_evaluation(model: torch.nn.Module, benchmark: LMBenchmark, args: argparse.Namespace,
                      stopwatch: Stopwatch, root: Path) -> None:
    """Time ``strategy.eval`` over every experience's test set, counting its scored tokens
    (compiled blocks under ``--compile``, as a compiled module scores language-modelling test sets)."""
    module = ContinualLMModule(model, compile=args.compile)
    strategy = strategy_class("naive")(
        module=module,
        eval_mb_size=args.eval_batch_size,
        seed=args.seed,
        trainer_kwargs=engine_trainer_kwargs(args, stopwatch.device),
        root_dir=root / "evaluation",
    )
    stopwatch.start()
    strategy.eval(benchmark.test_stream)
    stopwatch.stop()
    # a document of n tokens scores its n - 1 next-token predictions
    stopwatch.count(sum(int(item["input_ids"].shape[0]) - 1 for experience in benchmark.test_stream
                        for item in experience.dataset))


def build_stream(args: argparse.Namespace) -> tuple[LMBenchmark, int]:
    """(the benchmark, the vocabulary size a from-scratch model needs) of ``--data``."""
    texts: list[list[str]]
    if args.data == "dbpedia":
        from metakv_cl.data.dbpedia import dbpedia_topic_tasks

        tasks = dbpedia_topic_tasks(topics_per_experience=1, max_train_per_topic=args.documents, max_test_per_topic=2)
        texts = [list(task.train) for task in tasks[: args.experiences]]
    else:
        from metakv_cl.data.synthetic import synthetic_topic_tasks

        tasks = synthetic_topic_tasks(num_experiences=args.experiences, entities_per_topic=16, seed=args.seed)
        texts = [list(task.train)[: args.documents] for task in tasks]
    if len(texts) < args.experiences or any(len(group) < args.documents for group in texts):
        raise ValueError(f"--data {args.data} has fewer than {args.experiences} experiences of {args.documents} documents")
    tokenizer = load_tokenizer(MODELS[args.model][2])
    if args.model == "tiny":  # a tiny model's compute would go to an output layer of unused tokens
        tokenizer = CompactVocabulary(tokenizer, [text for group in texts for text in group])
    # the test sets are the training documents: what the evaluation path scores
    stream = [TextTask(f"topic{k}", train=group, test=group) for k, group in enumerate(texts)]
    benchmark = make_benchmark(stream, tokenizer, max_length=args.max_length, overflow="truncate")
    return benchmark, len(tokenizer)


def build_model(args: argparse.Namespace, tokenizer_size: int) -> torch.nn.Module:
    """The initial model of every path (fp32 weights; bf16 runs autocast)."""
    architecture, overrides, _ = MODELS[args.model]
    if args.model == "smollm2-135m":
        return load_causal_lm(architecture)
    vocab_size = args.vocab_size or tokenizer_size
    if vocab_size < tokenizer_size:
        raise ValueError(f"--vocab-size {vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens")
    overrides = {**overrides, "vocab_size": vocab_size}
    if architecture == "gpt2":
        overrides["n_positions"] = max(args.max_length, args.pack_length)
    return load_causal_lm(architecture, from_scratch=True, config_overrides=overrides)


PathRun = Callable[[torch.nn.Module, Stopwatch, Path], None]


def build_paths(args: argparse.Namespace, benchmark: LMBenchmark) -> dict[str, PathRun]:
    """Every path of a round, in the order a round runs them: the bare loops, the presets, the evaluation."""
    paths: dict[str, PathRun] = {
        BARE_PADDED: lambda model, watch, root: bare_loop(model, benchmark, args, False, watch),
        BARE_PACKED: lambda model, watch, root: bare_loop(model, benchmark, args, True, watch),
    }
    for preset in args.presets:
        paths[f"engine {preset}"] = lambda model, watch, root, preset=preset: engine_run(
            model, benchmark, args, preset, watch, root
        )
    if args.eval_batch_size:
        paths[EVALUATION] = lambda model, watch, root: engine_evaluation(model, benchmark, args, watch, root)
    return paths


def measure(run: PathRun, initial: torch.nn.Module, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run one path from the initial weights: its timed tokens and seconds, and its wall time.

    The wall time is the whole path (copying the model, Lightning's set-up, compilation, untimed
    batches, freeing memory): what a run's deadline pays, next to the timed stretch.
    """
    began = wall_clock()
    pl.seed_everything(args.seed, workers=True, verbose=False)
    stopwatch = Stopwatch(torch.device(args.device))
    run(copy.deepcopy(initial), stopwatch, root)
    _free(stopwatch.device)
    return {"tokens": stopwatch.token_count, "tokens_per_s": stopwatch.tokens_per_second,
            "timed_s": stopwatch.seconds, "wall_s": wall_clock() - began}


def over_budget(args: argparse.Namespace, started: float, name: str, measurements: list[dict[str, Any]]) -> bool:
    """Whether running path ``name`` now would end past ``--time-budget``.

    Its last wall time predicts its next (a warm-up's, with compilation, errs long); a path not run
    yet is predicted at 0 s, so only an already spent budget stops it.
    """
    if args.time_budget is None:
        return False
    last_wall = next((run["wall_s"] for run in reversed(measurements) if run["path"] == name), 0.0)
    return wall_clock() - started + last_wall > args.time_budget


def run_header(args: argparse.Namespace, commit: str, benchmark: LMBenchmark, initial: torch.nn.Module) -> dict[str, Any]:
    """What a run measured with: command, commit, device, versions, settings, model and documents."""
    device = torch.device(args.device)
    lengths = [int(item["input_ids"].shape[0]) for experience in benchmark.train_stream for item in experience.dataset]
    return {
        "command": shlex.join(["python", *sys.argv]),
        "commit": commit,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "pytorch_lightning": pl.__version__},
        "settings": {key: value for key, value in vars(args).items() if key not in ("out", "commit")},
        "model_parameters": sum(p.numel() for p in initial.parameters()),
        "documents": len(lengths),
        "document_tokens": {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)},
    }


def round_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A path's median tokens/s over its timed rounds, with every round's tokens/s and wall time."""
    speeds = [run["tokens_per_s"] for run in runs]
    return {"tokens_per_s": statistics.median(speeds), "tokens_per_s_rounds": speeds,
            "wall_s_rounds": [run["wall_s"] for run in runs]}


def summarise(args: argparse.Namespace, names: list[str], measurements: list[dict[str, Any]],
              stopped: str | None) -> dict[str, Any]:
    """The progress and the tables of the path runs finished so far (all of them once ``complete``)."""
    timed = {name: [run for run in measurements if run["path"] == name and not run["warm_up"]] for name in names}
    reference = BARE_PACKED if args.layout == "packed" else BARE_PADDED
    reference_speed = statistics.median(run["tokens_per_s"] for run in timed[reference]) if timed[reference] else None
    planned = len(names) * (args.warmup_rounds + args.rounds)
    paths = {name: {**round_summary(runs), "timed_tokens": runs[-1]["tokens"]}
             for name, runs in timed.items() if runs and name != EVALUATION}
    for row in paths.values():
        row["ratio"] = row["tokens_per_s"] / reference_speed if reference_speed else None
    evaluation = timed.get(EVALUATION)
    return {
        "complete": len(measurements) == planned,
        "progress": {"path_runs_finished": len(measurements), "path_runs_planned": planned,
                     # a round runs its paths in order, so it is finished once its last path is
                     "rounds_finished": len(timed[names[-1]]), "stopped": stopped},
        "reference": reference,
        "paths": paths,
        "evaluation": ({**round_summary(evaluation), "batch_size": args.eval_batch_size,
                        "scored_tokens": evaluation[-1]["tokens"]} if evaluation else None),
        "measurements": measurements,
    }


def run_label(warm_up: bool, number: int, rounds: int) -> str:
    return f"warm-up {number}" if warm_up else f"round {number}/{rounds}"


def console_line(run: dict[str, Any], rounds: int) -> str:
    unit = "scored tokens/s" if run["path"] == EVALUATION else "tokens/s"
    return (f"{run_label(run['warm_up'], run['round'], rounds)}  {run['path']:17s} {run['tokens_per_s']:12,.1f} {unit}  "
            f"wall {run['wall_s']:7.1f} s (timed steps {run['timed_s']:.1f} s)")


def run_paths(args: argparse.Namespace, save: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
    """Measure every path ``--rounds`` times, interleaved; return the result (see the module docstring).

    ``save`` gets the result so far after every path run (and once before the first), so a run
    killed or stopped by ``--time-budget`` keeps what it measured.
    """
    started = wall_clock()  # --time-budget counts the set-up too: a deadline does
    commit = args.commit or _commit()  # before the run: the code measured, whatever changes while it runs
    benchmark, tokenizer_size = build_stream(args)
    longest = max(int(item["input_ids"].shape[0]) for experience in benchmark.train_stream for item in experience.dataset)
    if args.pack_length < longest:
        raise ValueError(f"--pack-length {args.pack_length} is shorter than the longest document ({longest} tokens)")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    initial = build_model(args, tokenizer_size)
    paths = build_paths(args, benchmark)
    header = run_header(args, commit, benchmark, initial)
    measurements: list[dict[str, Any]] = []
    stopped = None

    def result() -> dict[str, Any]:
        return {**header, **summarise(args, list(paths), measurements, stopped)}

    rounds = [(True, k + 1) for k in range(args.warmup_rounds)] + [(False, k + 1) for k in range(args.rounds)]
    plan = [(warm_up, number, name) for warm_up, number in rounds for name in paths]
    save(result())
    with tempfile.TemporaryDirectory() as folder:
        for warm_up, number, name in plan:
            if over_budget(args, started, name, measurements):
                stopped = (f"--time-budget {args.time_budget:g} s: stopped before "
                           f"{run_label(warm_up, number, args.rounds)} {name}")
                break
            run = {"warm_up": warm_up, "round": number, "path": name,
                   **measure(paths[name], initial, args, Path(folder) / str(len(measurements)))}
            measurements.append(run)
            print(console_line(run, args.rounds), flush=True)
            save(result())
    if stopped:
        print(stopped, flush=True)
        save(result())
    return result()


def _free(device: torch.device) -> None:
    """Free a finished path's model, optimizer and trainer (they sit in reference cycles) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def render_markdown(result: dict[str, Any]) -> str:
    """The results page of one run, from its JSON."""
    settings = result["settings"]
    lines = [
        "# Engine training throughput against a bare PyTorch loop",
        "",
        *partial_run_lines(result),
        f"Command: `{result['command']}`  ",
        f"Commit: `{result['commit']}`; device: {result['device']} ({result['torch_threads']} torch threads); "
        + ", ".join(f"{name} {version}" for name, version in result["versions"].items()),
        "",
        f"Model: `{settings['model']}` ({result['model_parameters']:,} parameters), precision {settings['precision']}"
        f"{', torch.compile' if settings['compile'] else ''}. Data: `{settings['data']}`, {settings['experiences']} "
        f"experiences, {result['documents']} training documents of {result['document_tokens']['mean']:.0f} tokens on "
        f"average ({result['document_tokens']['min']}-{result['document_tokens']['max']}), batches of "
        f"{settings['batch_size']} documents, packed rows of {settings['pack_length']} tokens; engine layout "
        f"{settings['layout']}. Each fit's first {settings['skip_steps']} batch(es) untimed; median of "
        f"{settings['rounds']} interleaved rounds after {settings.get('warmup_rounds', 0)} untimed warm-up round(s).",
        "",
        f"| path | tokens/s | x {result['reference']} | timed tokens | tokens/s per round |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in result["paths"].items():
        rounds = ", ".join(f"{value:,.0f}" for value in row["tokens_per_s_rounds"])
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"  # the reference has no finished round
        lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {ratio} | {row['timed_tokens']:,} | {rounds} |")
    evaluation = result["evaluation"]
    if evaluation:
        rounds = ", ".join(f"{value:,.0f}" for value in evaluation["tokens_per_s_rounds"])
        lines += ["", f"Evaluation (`strategy.eval` of every experience end to end, batches of {evaluation['batch_size']} "
                  f"documents, {evaluation['scored_tokens']:,} scored tokens): **{evaluation['tokens_per_s']:,.0f} "
                  f"scored tokens/s** (per round: {rounds})."]
    return "\n".join(lines + wall_time_lines(result)) + "\n"


def partial_run_lines(result: dict[str, Any]) -> list[str]:
    """The warning that opens the page of a run that did not finish (none for a complete one)."""
    if result["complete"]:
        return []
    progress = result["progress"]
    why = progress["stopped"] or "the run ended there (killed, or a path failed: see its console)"
    return [f"**Partial run**: {progress['path_runs_finished']} of {progress['path_runs_planned']} path runs finished, "
            f"{progress['rounds_finished']} of {result['settings']['rounds']} timed rounds; {why}. Medians and "
            "ratios are over the finished rounds only.", ""]


def wall_time_lines(result: dict[str, Any]) -> list[str]:
    """Every path run's wall time beside its timed stretch: where a run's time went outside the timed steps."""
    lines = ["", "Wall time of every path run (the whole path: Lightning's set-up, compilation, untimed batches, "
             "evaluation), against its timed steps:", "",
             "| run | path | tokens/s | timed steps s | wall s | outside timed steps s |", "|---|---|---:|---:|---:|---:|"]
    for run in result["measurements"]:
        label = run_label(run["warm_up"], run["round"], result["settings"]["rounds"])
        lines.append(f"| {label} | {run['path']} | {run['tokens_per_s']:,.0f} | {run['timed_s']:.2f} | "
                     f"{run['wall_s']:.2f} | {run['wall_s'] - run['timed_s']:.2f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--vocab-size", type=int, help="vocabulary of a from-scratch model (default: the tokenizer's)")
    parser.add_argument("--data", choices=("synthetic", "dbpedia"), default="synthetic",
                        help="synthetic topics (embedded) or DBpedia abstracts (../shared/data/dbpedia14)")
    parser.add_argument("--experiences", type=int, default=2)
    parser.add_argument("--documents", type=int, default=48, help="training documents per experience")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per document (longer ones are cut)")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per mini-batch")
    parser.add_argument("--pack-length", type=int, default=128, help="tokens per packed row")
    parser.add_argument("--layout", choices=("padded", "packed"), default="packed", help="the engine's batches")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine, the packed bare loop and the bare loop in the engine's layout")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=list(PRESETS))
    parser.add_argument("--eval-batch-size", type=int, default=0,
                        help="also time the engine's evaluation of every experience in batches of this many documents (0: not)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--skip-steps", type=int, default=1, help="untimed batches at the start of each fit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-rounds", type=int, default=0,
                        help="untimed rounds first (every path once): compilation and caches warm, as in a long run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="stop before a path whose last wall time would end the run past this many seconds "
                             "from its start, and write a partial result (default: no budget)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md after every path run (a partial run says so)")
    parser.add_argument("--commit", help="the commit being measured (default: git rev-parse HEAD; for a copy without .git)")
    args = parser.parse_args(argv)
    for name in ("experiences", "documents", "batch_size", "rounds", "lr"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("skip_steps", "warmup_rounds", "eval_batch_size"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be > 0, got {args.time_budget}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        if device.index is not None:
            torch.cuda.set_device(device)  # the engine's resident strategy trains on the current device
    result = run_paths(args, save=lambda result: write_result(result, args.out) if args.out else None)
    print(render_markdown(result))
    return result


def write_result(result: dict[str, Any], out: Path) -> None:
    """Replace ``OUT.json`` and ``OUT.md``, each atomically: a run killed mid-write leaves whole files."""
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(text, out.with_suffix(".json"))
    atomic_write_text(render_markdown(json.loads(text)), out.with_suffix(".md"))  # the page of the JSON as saved


if __name__ == "__main__":
    main()
