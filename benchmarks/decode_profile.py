"""Where a graphed decoding step spends its device time: plain model against Meta-KV, per kernel.

Both decoders are :class:`GraphedDecoder` s, so the host is out of the picture and a token's wall
time is the device's. For each variant the script replays the captured step under
``torch.profiler`` and reports the wall time per token, the summed kernel time per token, and the
kernels by total time. The kernels that Meta-KV adds (names absent from the plain step, or run
more often) are listed apart, with their time per layer, which is the number to set against the
per-layer budget of the >= 0.9 x target (a tenth of the plain step's time, spread over its layers)::

    python benchmarks/decode_profile.py --shape gpt2 --batch 1 --context 896      # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.perf import SHAPES, build_base, replay_seconds
from metakv_cl.modeling import MetaKVConfig, add_meta_kv
from metakv_cl.modeling.graphed_decoding import GraphedDecoder


def kernel_times(decoder: GraphedDecoder, replays: int) -> tuple[Counter, Counter]:
    """Total device microseconds and launch counts per kernel name over ``replays`` replays."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(replays):
            decoder.graph.replay()
        torch.cuda.synchronize()
    micros, counts = Counter(), Counter()
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            micros[event.name] += event.time_range.elapsed_us()
            counts[event.name] += 1
    return micros, counts


def profile_variant(model, batch: int, context: int, fused: bool, replays: int) -> dict:
    """Capture the model's step, then time and profile its replays."""
    # generate() below fills 4 slots; the timed and the profiled replays one each.
    decoder = GraphedDecoder(model, batch, context + 4 + 2 * replays, fused_meta_kv=fused)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda")
    decoder.generate(ids, max_new_tokens=4)  # prefill, warm-up and capture
    seconds = replay_seconds(decoder, replays)  # device time per token = wall time: the host only replays
    micros, counts = kernel_times(decoder, replays)
    if not micros:
        raise RuntimeError("the profiler recorded no kernels inside the CUDA graph (CUPTI graph tracing unavailable)")
    return {
        "wall_us_per_token": seconds * 1e6,
        "kernel_us_per_token": sum(micros.values()) / replays,
        "kernels_per_token": sum(counts.values()) / replays,
        "kernels": {name: {"us_per_token": micros[name] / replays, "launches_per_token": counts[name] / replays}
                    for name in sorted(micros, key=micros.get, reverse=True)},
    }


def added_kernels(plain: dict, meta_kv: dict, layers: int) -> list[dict]:
    """Kernels the Meta-KV step runs beyond the plain one: extra launches and their time, per layer."""
    rows = []
    for name, stats in meta_kv["kernels"].items():
        base = plain["kernels"].get(name, {"us_per_token": 0.0, "launches_per_token": 0.0})
        extra_launches = stats["launches_per_token"] - base["launches_per_token"]
        if extra_launches > 0.5:
            share = extra_launches / stats["launches_per_token"]  # the added launches' share of this kernel's time
            rows.append({"kernel": name[:90], "launches_per_layer": extra_launches / layers,
                         "us_per_layer": stats["us_per_token"] * share / layers})
    return sorted(rows, key=lambda row: row["us_per_layer"], reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=896)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--source", default="mean")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="write the full per-kernel tables as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("decode_profile.py profiles CUDA graphs: it needs a CUDA GPU")

    base = build_base(args.shape, "cuda").to(torch.bfloat16).eval()
    meta_kv = add_meta_kv(copy.deepcopy(base), MetaKVConfig(source=args.source, rank=args.rank)).eval()
    layers = len(meta_kv.meta_kv.layers)
    variants = {"plain": (base, False), f"{args.source} torch path": (meta_kv, False), f"{args.source} fused": (meta_kv, True)}
    with torch.no_grad():
        results = {name: profile_variant(model, args.batch, args.context, fused, args.replays)
                   for name, (model, fused) in variants.items()}
    plain = results["plain"]
    budget = plain["wall_us_per_token"] * (1 / 0.9 - 1) / layers
    print(f"{args.shape}, batch {args.batch}, context {args.context}: the 0.9 x target leaves {budget:.1f} us per layer")
    print("| variant | wall us/token | kernel us/token | kernels/token | x plain |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        print(f"| {name} | {result['wall_us_per_token']:.1f} | {result['kernel_us_per_token']:.1f} | "
              f"{result['kernels_per_token']:.0f} | {plain['wall_us_per_token'] / result['wall_us_per_token']:.3f} |")
    for name, result in results.items():
        if name == "plain":
            continue
        extra_wall = (result["wall_us_per_token"] - plain["wall_us_per_token"]) / layers
        print(f"\n{name}: {extra_wall:.1f} us per layer over plain (wall); kernels it adds, per layer:")
        for row in added_kernels(plain, result, layers):
            print(f"  {row['us_per_layer']:6.2f} us  x{row['launches_per_layer']:.1f}  {row['kernel']}")
    print("\nplain step, top kernels (us per token):")
    for name, stats in list(plain["kernels"].items())[:12]:
        print(f"  {stats['us_per_token']:7.1f} us  x{stats['launches_per_token']:.0f}  {name[:90]}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
