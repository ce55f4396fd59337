"""Extra parameters and time overhead of Meta-KV against the plain model, measured in one run.

Every variant (plain, then each meta-state source x modulation form) is timed on the same
model shape, inputs and device, interleaved over several rounds so that drift in the machine's
speed hits all variants alike; the table reports the median time and the ratio to plain.

    python -m metakv_cl.benchmarks.meta_kv_overhead --shape gpt2 --seq-len 256 --batch 1
    python -m metakv_cl.benchmarks.meta_kv_overhead --mode train --device cuda --dtype bfloat16 --seq-len 1024
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
from metakv_cl.modeling import FORMS, SOURCES, MetaKVConfig, add_meta_kv, freeze_base, meta_kv_parameters

SHAPES = {
    "gpt2": ("gpt2", {}),  # the 124M shape
    "smollm2": ("smollm2-135m", None),
    "gpt2-tiny": ("gpt2", {"n_layer": 2, "n_embd": 128, "n_head": 4}),
}


def build_base(shape: str) -> torch.nn.Module:
    name, overrides = SHAPES[shape]
    if overrides is None:
        return load_causal_lm(name)
    return load_causal_lm(name, from_scratch=True, config_overrides=overrides)


def time_call(step, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--mode", choices=["forward", "train"], default="forward")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--forms", nargs="+", default=list(FORMS))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = build_base(args.shape).to(args.device)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), device=args.device)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    variants: dict[str, torch.nn.Module] = {"plain": base}
    for source in args.sources:
        for form in args.forms:
            model = add_meta_kv(copy.deepcopy(base), MetaKVConfig(source=source, form=form, rank=args.rank))
            variants[f"{source}/{form}"] = model

    def step_for(model):
        if args.mode == "forward":
            model.eval()

            def forward():
                with torch.no_grad(), autocast:
                    model(ids)

            return forward
        model.train()
        if model is not base:
            freeze_base(model)

        def train_step():
            with autocast:
                loss = model(ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        return train_step

    steps = {name: step_for(model) for name, model in variants.items()}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_call(step, args.device))

    plain_params = sum(p.numel() for p in base.parameters())
    plain_time = statistics.median(times["plain"])
    rows = []
    for name, model in variants.items():
        extra = 0 if name == "plain" else sum(p.numel() for p in meta_kv_parameters(model))
        median = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "extra_params": extra,
                "extra_params_pct": 100.0 * extra / plain_params,
                "median_s": median,
                "ratio_to_plain": median / plain_time,
                "tokens_per_s": args.batch * args.seq_len / median,
            }
        )
    print(f"{args.shape} ({plain_params / 1e6:.1f}M params), {args.mode}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.device} {args.dtype}, median of {args.rounds} interleaved rounds")
    print("| variant | extra params | extra % | median s | time / plain | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['extra_params']:,} | {row['extra_params_pct']:.2f} | {row['median_s']:.4f} | "
              f"{row['ratio_to_plain']:.3f} | {row['tokens_per_s']:.0f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
