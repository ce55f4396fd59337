"""How fast the compacted KV cache compacts: one-shot compaction of a long context, and chunked prefill.

For every method (``--methods``):

* **compaction**: a ``--context``-token input (real WikiText-2 text when the shared data and the
  tokenizer are there, else random ids) is read into a :class:`~metakv_cl.kv.CompactedCache`
  that never compacts on its own (``max_tokens=None``), capturing the method's reference
  queries or attention statistics; then every layer and KV head is compacted to ``--budget``
  of it at once, stacked (``cache.compact(batch_layers=True)``: layers of equal shapes in one
  call where the method allows) and, interleaved with it in the same run, layer by layer
  (``batch_layers=False``: a Python loop over layers). ``cache.compact`` stacks by default on an
  accelerator and loops on the CPU (``default_path``). Timed with the device synchronised
  around the call, after one warm-up of each, as the median of ``--repeats`` runs, each on a
  fresh copy of the prefilled cache (copied outside the timed region). On CUDA the host synchronisations of one compaction are counted
  too (``torch.cuda.set_sync_debug_mode``).
* **chunked prefill**: ``--prefill-tokens`` tokens read in ``--prefill-chunk``-token chunks into
  a cache of ``--prefill-max-tokens``, compacting whenever it is full; tokens per second, after
  a warm-up read of two cache sizes.

Peak device memory (``torch.cuda.max_memory_allocated``, reset before each measurement) is
recorded for both; the JSON (``--out``) also holds the device, torch and transformers versions,
the commit and the date. The last thing printed is a Markdown table.

Shapes: ``smollm2`` (SmolLM2-135M from ``metakv_cl.hub``: the hub or the offline GGUF),
``random-smollm2`` (the same config, randomly initialised: runs without the GGUF) and ``tiny``
(a 2-layer Llama for smoke tests). bf16 on CUDA, fp32 on CPU. ::

    python benchmarks/compaction_speed.py --shape random-smollm2 --context 2048 --repeats 2   # CPU
    python benchmarks/compaction_speed.py --shape smollm2 --device cpu --context 2048 --repeats 5 --prefill-tokens 0 \
        --methods attention_matching,attention_matching:selection=omp,h2o \
        --out benchmarks/results/compaction_speed_cpu_2048.json    # the committed CPU measurement
    python benchmarks/compaction_speed.py --shape smollm2 --device cuda --out compaction_speed.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import json
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import transformers
from metakv_cl.kv import CompactedCache, KVCompressor, chunked_prefill, get_method

SHAPES = ("smollm2", "random-smollm2", "tiny")
# SmolLM2-135M's architecture (Llama): 30 layers, 9 query heads sharing 3 KV heads of 64 dims.
SMOLLM2_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
DEFAULT_METHODS = "attention_matching,attention_matching:selection=omp,h2o,sliding_window"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class MethodSpec:
    """A method under test: a registered name and constructor options, written ``name[:key=value...]``."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        """``"attention_matching:selection=omp"`` -> name ``attention_matching``, options ``{"selection": "omp"}``.

        Raises:
            ValueError: an option not written ``key=value``, or an unknown method or option.
        """
        name, *pairs = spec.strip().split(":")
        options: dict[str, Any] = {}
        for pair in pairs:
            key, equals, raw = pair.partition("=")
            if not equals or not key:
                raise ValueError(f"method option {pair!r} in {spec!r} must be written key=value")
            try:
                options[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                options[key] = raw
        get_method(name, **options)  # unknown names and options fail here
        return cls(spec.strip(), name, options)

    def build(self) -> KVCompressor:
        return get_method(self.name, **self.options)


# --- model and inputs ------------------------------------------------------------------------
def load_model(shape: str, device: str, dtype: torch.dtype):
    """(model in eval mode on ``device`` in ``dtype``, tokenizer or None) for a shape of :data:`SHAPES`."""
    from metakv_cl import hub

    torch.manual_seed(0)
    if shape == "smollm2":
        return hub.load_causal_lm("smollm2-135m", dtype=dtype).to(device), hub.load_tokenizer("smollm2-135m")
    if shape == "random-smollm2":
        model = hub.load_causal_lm("llama", from_scratch=True, config_overrides=SMOLLM2_CONFIG, dtype=dtype)
        return model.to(device), None
    if shape == "tiny":
        from metakv_cl.testing import tiny_llama

        return tiny_llama().to(device=device, dtype=dtype), None
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def input_ids(tokenizer, length: int, vocab_size: int, data_root: Path | None) -> tuple[torch.Tensor, str]:
    """[1, length] ids: the start of WikiText-2 valid when the tokenizer and the data are there, else random ids.

    Returns:
        (ids, source): ``source`` is ``"wikitext2"`` or ``"random"``.
    """
    from metakv_cl.data.dbpedia import default_data_root

    path = (data_root or default_data_root()) / "wikitext2" / "valid.txt"
    if tokenizer is not None and path.is_file():
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            return torch.tensor([ids[:length]]), "wikitext2"
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab_size, (1, length), generator=generator), "random"


# --- measuring -------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measured(device: str, run: Callable[[], Any]) -> tuple[float, int | None, int | None]:
    """Run ``run`` once, synchronised: (seconds, peak device bytes, peak bytes beyond those allocated at the start).

    The peaks are None off CUDA.
    """
    cuda = device.startswith("cuda")
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    started = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - started
    if not cuda:
        return seconds, None, None
    peak = torch.cuda.max_memory_allocated()
    return seconds, peak, peak - start_bytes


def host_syncs(device: str, run: Callable[[], Any]) -> int | None:
    """Host synchronisations ``run`` makes on CUDA (counted by torch's sync debug mode), None off CUDA."""
    if not device.startswith("cuda"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_table(device: str, run: Callable[[], Any], rows: int = 25) -> str:
    """torch.profiler's table of the ops ``run`` spends most time in (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as profiler:
        run()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def prefilled_cache(model, spec: MethodSpec, ids: torch.Tensor, reference_queries: int, chunk: int) -> CompactedCache:
    """A cache of ``spec`` holding all of ``ids`` (never compacted), with its queries or attention statistics."""
    cache = CompactedCache(spec.build(), None, config=model.config, reference_queries=reference_queries)
    chunked_prefill(model, cache, ids, chunk_size=chunk)
    return cache


def compaction_speed(model, spec: MethodSpec, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Time compacting every layer of a prefilled cache to ``args.budget`` (see the module docstring)."""
    prefilled = prefilled_cache(model, spec, ids, args.reference_queries, args.chunk)

    def compact_a_copy(batch_layers: bool) -> tuple[float, int | None, int | None, CompactedCache]:
        cache = copy.deepcopy(prefilled)  # outside the timed region
        return (*measured(args.device, lambda: cache.compact(args.budget, batch_layers=batch_layers)), cache)

    compact_a_copy(batch_layers=True), compact_a_copy(batch_layers=False)  # warm-up
    runs, layer_loop = [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
        runs.append(compact_a_copy(batch_layers=True))
        layer_loop.append(compact_a_copy(batch_layers=False)[0])
    seconds = [run[0] for run in runs]
    compacted = runs[-1][3]
    fresh = copy.deepcopy(prefilled)
    row: dict[str, Any] = {
        "method": spec.label,
        "layers": len(prefilled.layers),
        "kv_heads": prefilled.layers[0].keys.shape[1],
        "entries_before": prefilled.get_seq_length(),
        "entries_after": compacted.get_seq_length(),
        "reference_queries": None if prefilled.layers[0].reference_queries is None
        else prefilled.layers[0].reference_queries.shape[2],
        "compaction_seconds": statistics.median(seconds),
        "compaction_seconds_min": min(seconds),
        "compaction_seconds_all": seconds,
        "layer_loop_seconds": statistics.median(layer_loop),
        "layer_loop_seconds_all": layer_loop,
        "default_path": "stacked" if prefilled.on_accelerator() else "layer loop",
        "compaction_peak_bytes": runs[-1][1],
        "compaction_extra_peak_bytes": runs[-1][2],
        "compaction_host_syncs": host_syncs(args.device, lambda: fresh.compact(args.budget)),
    }
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        fresh = copy.deepcopy(prefilled)
        table = profile_table(args.device, lambda: fresh.compact(args.budget))
        (args.profile_dir / f"profile_{spec.label.replace(':', '_').replace('=', '-')}.txt").write_text(table)
    return row


def prefill_speed(model, spec: MethodSpec, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Tokens per second of a chunked prefill of ``ids`` into a cache of ``args.prefill_max_tokens``."""

    def read(tokens: torch.Tensor) -> CompactedCache:
        cache = CompactedCache(spec.build(), args.prefill_max_tokens, config=model.config,
                               reference_queries=args.reference_queries)
        chunked_prefill(model, cache, tokens, chunk_size=args.prefill_chunk)
        return cache

    read(ids[:, : 2 * args.prefill_max_tokens])  # warm-up, compactions included
    caches: list[CompactedCache] = []
    seconds, peak, extra = measured(args.device, lambda: caches.append(read(ids)))
    return {
        "prefill_tokens": ids.shape[1],
        "prefill_max_tokens": args.prefill_max_tokens,
        "prefill_chunk": args.prefill_chunk,
        "prefill_seconds": seconds,
        "prefill_tokens_per_second": ids.shape[1] / seconds,
        "prefill_compactions": caches[0].stats()["compactions"],
        "prefill_peak_bytes": peak,
        "prefill_extra_peak_bytes": extra,
    }


# --- reporting -------------------------------------------------------------------------------
def environment(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Device, library versions, commit and date of the run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine()
    return {
        "device": device,
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method: compaction time (median, per layer), host syncs, peak memory, prefill speed."""
    lines = [
        "| method | stacked s (median) | min s | layer by layer s | ms / layer | host syncs "
        "| compaction peak MiB (+extra) | prefill tok/s | prefill compactions | prefill peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        syncs = "-" if row["compaction_host_syncs"] is None else str(row["compaction_host_syncs"])
        prefill = (f"{row['prefill_tokens_per_second']:.0f} | {row['prefill_compactions']} | "
                   f"{_mib(row['prefill_peak_bytes'])}") if "prefill_seconds" in row else "- | - | -"
        lines.append(
            f"| {row['method']} | {row['compaction_seconds']:.4f} | {row['compaction_seconds_min']:.4f} | "
            f"{row['layer_loop_seconds']:.4f} | "
            f"{1000 * row['compaction_seconds'] / row['layers']:.2f} | {syncs} | "
            f"{_mib(row['compaction_peak_bytes'])} (+{_mib(row['compaction_extra_peak_bytes'])}) | {prefill} |"
        )
    return "\n".join(lines)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated methods, each NAME[:KEY=VALUE...] (e.g. attention_matching:selection=omp)")
    parser.add_argument("--context", type=int, default=4096, help="tokens read, then compacted at once")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the context kept by the compaction")
    parser.add_argument("--repeats", type=int, default=5, help="timed compactions per method (after one warm-up)")
    parser.add_argument("--chunk", type=int, default=512, help="chunk size of the prefill before the compaction")
    parser.add_argument("--reference-queries", type=int, default=1024, help="reference queries kept per KV head")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="tokens of the chunked-prefill measurement (0: skip it)")
    parser.add_argument("--prefill-max-tokens", type=int, default=1024, help="cache capacity of the chunked prefill")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="chunk size of the chunked prefill")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding wikitext2/valid.txt")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="write torch.profiler's table of one compaction per method here")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = parser.parse_args(argv)
    try:
        args.specs = [MethodSpec.parse(spec) for spec in args.methods.split(",") if spec.strip()]
    except ValueError as error:
        parser.error(str(error))
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    if args.repeats < 1 or args.context < 2 or args.chunk < 1 or args.prefill_chunk < 1 or args.prefill_tokens < 0:
        parser.error("--repeats, --chunk and --prefill-chunk must be >= 1, --context >= 2, --prefill-tokens >= 0")
    if args.prefill_tokens and args.prefill_max_tokens < 1:
        parser.error("--prefill-max-tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every method, write the JSON, print the table; returns the exit status."""
    args = parse_arguments(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_model(args.shape, args.device, dtype)
    ids, source = input_ids(tokenizer, max(args.context, args.prefill_tokens), model.config.vocab_size, args.data_root)
    ids = ids.to(args.device)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key != "specs"}
    report = {"environment": environment(args.device, dtype), "config": {**config, "input": source}, "results": []}
    for spec in args.specs:
        row = compaction_speed(model, spec, ids[:, : args.context], args)
        if args.prefill_tokens:
            row.update(prefill_speed(model, spec, ids[:, : args.prefill_tokens], args))
        report["results"].append(row)
        if args.out is not None:  # after every method, so that a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
        print(f"{spec.label}: compaction {row['compaction_seconds']:.4f} s, layer by layer {row['layer_loop_seconds']:.4f} s",
              flush=True)
    print(markdown_table(report["results"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
