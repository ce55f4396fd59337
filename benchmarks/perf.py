"""Meta-KV performance against the plain model, every ratio measured side by side in one run.

Sections (pick with --sections):

* ``forward``: forward-pass time and extra parameters of every meta-state source x form.
* ``train``: training-step throughput (forward + backward, bf16 autocast on GPU; every
  parameter trainable in every variant, so the ratio is Meta-KV's own cost) of the same variants, and the model FLOPs utilisation of the plain path against the measured matmul rate.
* ``decode``: cached greedy decoding tokens/s (weights in --dtype, no autocast), plain vs Meta-KV dynamic (mean; also
  through its fused Triton kernel where available) vs consolidated merged, at several batch sizes and context lengths,
  through transformers' ``generate`` (dynamic cache, and ``cache_implementation="static"``, which transformers
  compiles on CUDA) and through :class:`GraphedDecoder` (one CUDA graph per token). Graphed rows
  also time the prefill alone and, on the GPU, the graph replays alone (``decode_*``: the cached one-token steps).

Variants are interleaved over rounds, so drift in the machine's speed hits all of them alike;
tables report medians and the ratio to plain.

    python benchmarks/perf.py --shape gpt2 --sections forward --seq-len 256            # CPU
    python benchmarks/perf.py --device cuda --dtype bfloat16 --sections train decode --out perf.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from metakv_cl.hub import load_causal_lm
from metakv_cl.modeling.graphed_decoding import GraphedDecoder
from metakv_cl.modeling import (
    FORMS,
    SOURCES,
    MetaKVConfig,
    add_meta_kv,
    compile_meta_kv,
    merge_meta_kv,
    meta_kv_parameters,
)

# name -> (architecture, config overrides); every shape is built from its config, randomly initialised.
SHAPES = {
    "gpt2": ("gpt2", {}),  # GPT-2 small, 124M
    "smollm2": (
        "llama",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
    ),  # SmolLM2-135M
    "gpt2-tiny": ("gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4}),
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Suffixes of the graphed steps that time the prefill and first token only, and the decoding steps only.
PREFILL, STEPS = " (prefill)", " (steps)"


def build_base(shape: str, device: str, pad_vocab: int = 1) -> torch.nn.Module:
    """A randomly initialised model of ``shape``; ``pad_vocab`` > 1 rounds the vocabulary up to a
    multiple of it (nanoGPT's 50257 -> 50304), so the output head's matmul tiles evenly."""
    architecture, overrides = SHAPES[shape]
    model = load_causal_lm(architecture, from_scratch=True, config_overrides=overrides)
    if pad_vocab > 1:
        model.resize_token_embeddings(model.config.vocab_size, pad_to_multiple_of=pad_vocab, mean_resizing=False)
    return model.to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(steps: dict, rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each step, timing all steps round-robin after one warm-up each.

    A step that returns a float has timed itself (seconds): work with an untimed set-up.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            own_seconds = step()
            synchronize(device)
            times[name].append(own_seconds if isinstance(own_seconds, float) else time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def replay_seconds(decoder: GraphedDecoder, replays: int) -> float:
    """Device seconds of ``replays`` replays of the decoder's captured step (CUDA events, no host in between)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        decoder.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def matmul_tflops(device: str, dtype: torch.dtype, size: int = 8192, rounds: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) for ``dtype`` on ``device``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = interleaved_medians({"mm": lambda: a @ b}, rounds, device)["mm"]
    return 2 * size**3 / seconds / 1e12


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 6 L T d (attention scores and values), the PaLM count.

    N counts every weight that multiplies activations: the output head included (tied to the
    input embedding or not), the input embedding and learned position tables excluded (lookups).
    """
    config = model.config
    lookups = [model.get_input_embeddings().weight]
    positions = getattr(model.base_model, "wpe", None)
    if positions is not None:
        lookups.append(positions.weight)
    n_params = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in lookups)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        n_params += model.get_output_embeddings().weight.numel()
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return 6 * n_params + 6 * layers * seq_len * hidden


def language_model_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, computed outside the model so that torch.compile sees one graph."""
    logits = model(ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def meta_kv_variants(base, sources, forms, rank: int) -> dict[str, torch.nn.Module]:
    variants = {"plain": base}
    for source in sources:
        for form in forms:
            variants[f"{source}/{form}"] = add_meta_kv(copy.deepcopy(base), MetaKVConfig(source=source, form=form, rank=rank))
    return variants


def run_forward_or_train(args, base, train: bool) -> list[dict]:
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), device=args.device)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    variants = meta_kv_variants(base, args.sources, args.forms, args.rank)

    def step_for(name, model):
        if not train:
            model.eval()

            def forward():
                with torch.no_grad(), autocast:
                    model(ids, use_cache=False)

            return torch.compile(forward, mode=args.compile_mode) if args.compile else forward
        model.train()  # every parameter trains in every variant, so the ratio is Meta-KV's own cost
        loss_of = torch.compile(language_model_loss, mode=args.compile_mode) if args.compile else language_model_loss

        def train_step():
            with autocast:
                loss = loss_of(model, ids)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return train_step

    steps = {name: step_for(name, model) for name, model in variants.items()}
    if args.profile_dir is not None:
        profile_steps(steps, args.profile_dir, "train" if train else "forward", args.device)
    medians = interleaved_medians(steps, args.rounds, args.device)
    plain_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq_len
    rows = []
    for name, model in variants.items():
        extra = 0 if name == "plain" else sum(p.numel() for p in meta_kv_parameters(model))
        rows.append(
            {
                "section": "train" if train else "forward",
                "variant": name,
                "extra_params": extra,
                "extra_params_pct": 100.0 * extra / plain_params,
                "median_s": medians[name],
                "tokens_per_s": tokens / medians[name],
                "ratio_to_plain": medians["plain"] / medians[name],
            }
        )
    if train and args.device.startswith("cuda"):
        peak = matmul_tflops(args.device, torch.bfloat16)
        achieved = training_flops_per_token(base, args.seq_len) * tokens / medians["plain"] / 1e12
        rows[0]["mfu"] = achieved / peak
        rows[0]["matmul_tflops"] = peak
    del variants
    return rows


def fused_decoding_available(device: str) -> bool:
    """Whether Meta-KV's fused one-token kernel can run here (Triton on a CUDA device)."""
    if not device.startswith("cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def run_decode(args, base) -> list[dict]:
    """Decoding tokens/s of each variant, in each mode; ratios are to plain in the same mode.

    Modes: ``generate`` (transformers' generate with its dynamic cache, one host-issued kernel at
    a time), ``static`` (transformers' generate with ``cache_implementation="static"``, which
    compiles the decoding step itself on CUDA: the path transformers users know) and ``graphed``
    (:class:`GraphedDecoder`: a static cache and one CUDA graph per step).
    """
    rows = []
    base = copy.deepcopy(base).to(DTYPES[args.dtype])  # inference runs in the weights' own dtype, no autocast
    dynamic = add_meta_kv(copy.deepcopy(base), MetaKVConfig(source="mean", rank=args.rank)).eval()
    merged = merge_meta_kv(add_meta_kv(copy.deepcopy(base), MetaKVConfig(source="consolidated", rank=args.rank)).eval())
    variants = {"plain": base.eval(), "mean/factorized": dynamic, "consolidated merged": merged}
    if args.compile:  # compiling the whole model recompiles as the cache grows; compile Meta-KV's own work
        variants["mean/factorized compiled"] = compile_meta_kv(copy.deepcopy(dynamic))
    fused = "graphed" in args.decode_modes and fused_decoding_available(args.device)
    if fused:
        variants["mean/factorized fused"] = copy.deepcopy(dynamic)
        if args.compile:  # the prompt through compiled Meta-KV layers (any length), the steps through the kernel
            variants["mean/factorized fused, compiled prefill"] = compile_meta_kv(copy.deepcopy(dynamic), dynamic=True)
    max_positions = base.config.max_position_embeddings  # GPT-2's config maps it to n_positions
    for batch in args.decode_batches:
        for context in args.decode_contexts:
            if context + args.new_tokens > max_positions:
                continue
            ids = torch.randint(0, base.config.vocab_size, (batch, context), device=args.device)

            def generate(model, **options):
                return lambda: model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                              do_sample=False, pad_token_id=0, **options)

            def graphed(name, model, steps):
                decoder = GraphedDecoder(model, batch, context + args.new_tokens, fused_meta_kv="fused" in name)
                steps[name] = lambda: decoder.generate(ids, max_new_tokens=args.new_tokens)
                steps[name + PREFILL] = lambda: decoder.generate(ids, max_new_tokens=1)  # the prompt and the first token

                def decoding_steps() -> float:
                    decoder.generate(ids, max_new_tokens=1)  # untimed: a prefill resets the step buffers
                    return replay_seconds(decoder, args.new_tokens - 1)

                if decoder.cuda_graph:
                    steps[name + STEPS] = decoding_steps

            for mode in args.decode_modes:
                steps = {}
                for name, model in variants.items():
                    if mode == "generate" and "fused" not in name:
                        steps[name] = generate(model)
                    elif mode == "static" and "fused" not in name and not name.endswith("compiled"):
                        steps[name] = generate(model, cache_implementation="static")
                    elif mode == "graphed" and not name.endswith("compiled"):
                        graphed(name, model, steps)
                if args.profile_dir is not None and batch == args.decode_batches[0] and context == args.decode_contexts[0]:
                    profile_steps(steps, args.profile_dir, f"decode_{mode}", args.device, variants=("plain", "mean/factorized"))
                medians = interleaved_medians(steps, args.rounds, args.device)
                for name, seconds in medians.items():
                    if name.endswith((PREFILL, STEPS)):
                        continue
                    row = {"section": "decode", "mode": mode, "variant": name, "batch": batch, "context": context,
                           "median_s": seconds, "tokens_per_s": batch * args.new_tokens / seconds,
                           "ratio_to_plain": medians["plain"] / seconds}
                    if name + PREFILL in medians:
                        row.update(prefill_s=medians[name + PREFILL])
                    if name + STEPS in medians:  # the graphed decoding steps alone, timed on the device
                        row.update(decode_tokens_per_s=batch * (args.new_tokens - 1) / medians[name + STEPS],
                                   decode_ratio_to_plain=medians["plain" + STEPS] / medians[name + STEPS])
                    rows.append(row)
                del steps  # free this setting's static caches before the next
    return rows


def profile_steps(steps: dict, folder: Path, section: str, device: str, variants=("plain", "consolidated/factorized", "mean/factorized")) -> None:
    """Write torch.profiler tables (top ops by device and by host time) of one step per variant."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for name in variants:
        if name not in steps:
            continue
        steps[name]()  # warm-up (and compilation) outside the profile
        synchronize(device)
        with profile(activities=activities) as profiler:
            steps[name]()
            synchronize(device)
        averages = profiler.key_averages()
        sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        report = (f"# {section} {name}\n\n## by device time\n{averages.table(sort_by=sort, row_limit=40)}\n\n"
                  f"## by host self time\n{averages.table(sort_by='self_cpu_time_total', row_limit=25)}\n")
        (folder / f"profile_{section}_{name.replace('/', '_')}.txt").write_text(report)


def print_table(rows: list[dict]) -> None:
    columns = [c for c in ("section", "mode", "variant", "batch", "context", "extra_params", "median_s", "tokens_per_s",
                           "ratio_to_plain", "prefill_s", "decode_tokens_per_s", "decode_ratio_to_plain", "mfu")
               if any(c in row for row in rows)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value))
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--sections", nargs="+", choices=["forward", "train", "decode"], default=["forward"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--forms", nargs="+", default=list(FORMS))
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-modes", nargs="+", choices=["generate", "static", "graphed"],
                        default=["generate", "static", "graphed"],
                        help="generate: transformers' generate; static: generate with its static cache (compiled by "
                             "transformers on CUDA); graphed: GraphedDecoder (CUDA graph per step on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant's step (plain included)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--pad-vocab", type=int, default=1, help="round the vocabulary up to a multiple of this")
    parser.add_argument("--profile-dir", type=Path, default=None, help="write torch.profiler tables of one step here")
    parser.add_argument("--out", type=Path, default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    base = build_base(args.shape, args.device, args.pad_vocab)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.shape}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters on {device_name}, {args.dtype}, "
          f"batch {args.batch} x {args.seq_len} tokens, rank {args.rank}, median of {args.rounds} interleaved rounds")
    rows: list[dict] = []
    for section in args.sections:
        if section == "decode":
            rows += run_decode(args, base)
        else:
            rows += run_forward_or_train(args, base, train=section == "train")
        print_table([row for row in rows if row["section"] == section])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_name, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
