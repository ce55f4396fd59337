"""Microbenchmark: microseconds per layer of Meta-KV's one-token decoding work, CUDA-graphed.

The torch path (``MetaKVLayer.forward``, the in-place state copy and the add into the K/V
projection output) against the fused Triton kernel (``FusedDecodeStep``, adding into the output
in place) over its launch settings: programs per row (``max_splits``) and warps per program
("auto": the step's defaults).
Stacks of 30 layers of the GPT-2 124M and SmolLM2-135M attention shapes, bf16::

    python benchmarks/fused_decode_splits.py --out fused_decode_splits.json      # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.fused_decode import FusedDecodeStep
from metakv_cl.modeling.meta_kv import MetaKVLayer

LAYERS, DTYPE, DEVICE = 30, torch.bfloat16, "cuda"
SHAPES = {"gpt2": (768, 768), "smollm2": (576, 192)}  # (hidden, K/V features)


def graphed_us_per_layer(step, reps: int = 200) -> float:
    """Capture ``step`` (all layers) in a CUDA graph and time its replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps / LAYERS * 1e6


@torch.no_grad()
def measure(shape: str, source: str, batch: int, settings: list[tuple]) -> dict[str, float]:
    """us per layer of the torch path and of the fused kernel at each (max_splits, warps)."""
    hidden, kv_size = SHAPES[shape]
    config = MetaKVConfig(source=source, rank=8, state_dim=64)
    layers = [MetaKVLayer(config, hidden, kv_size).to(DEVICE, DTYPE) for _ in range(LAYERS)]
    memory = torch.randn(64, device=DEVICE, dtype=DTYPE) if source == "consolidated" else None
    states = [layer(torch.randn(batch, 4, hidden, device=DEVICE, dtype=DTYPE), None, None, memory)[1] for layer in layers]
    x = torch.randn(batch, 1, hidden, device=DEVICE, dtype=DTYPE)
    qkv = torch.randn(batch, 1, 3 * kv_size, device=DEVICE, dtype=DTYPE)  # the projection output (GPT-2's layout)
    k_out, v_out = qkv[..., kv_size : 2 * kv_size], qkv[..., 2 * kv_size :]

    def torch_path():
        for layer, state in zip(layers, states):
            delta, new = layer(x, None, state, memory)
            qkv[..., kv_size:] += delta
            for target, value in zip(state or (), new or ()):
                target.copy_(value)

    results = {"torch path": graphed_us_per_layer(torch_path)}
    for max_splits, warps in settings:
        steps = [FusedDecodeStep(layer, max_splits=max_splits, num_warps=warps) for layer in layers]
        name = f"splits {max_splits or 'auto'} ({steps[0].splits}), warps {warps or 'auto'} ({steps[0].num_warps})"
        results[name] = graphed_us_per_layer(
            lambda: [step(x, state, memory, k_out=k_out, v_out=v_out) for step, state in zip(steps, states)]
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--sources", nargs="+", default=["mean"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--splits", nargs="+", default=["auto", "3"], help="max_splits values ('auto': one per hidden chunk)")
    parser.add_argument("--warps", nargs="+", default=["auto", "2", "4"], help="warps per program ('auto': from the tile sizes)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("fused_decode_splits.py times CUDA graphs: it needs a CUDA GPU")
    settings = list(itertools.product(*([None if value == "auto" else int(value) for value in values]
                                        for values in (args.splits, args.warps))))
    rows = []
    for shape, source, batch in itertools.product(args.shapes, args.sources, args.batches):
        results = measure(shape, source, batch, settings)
        best = min((name for name in results if name != "torch path"), key=results.get)
        print(f"{shape} {source} batch {batch}: torch path {results['torch path']:.2f}, best fused {results[best]:.2f} ({best}) us/layer")
        for name, micros in results.items():
            print(f"    {micros:6.2f}  {name}")
            rows.append({"shape": shape, "source": source, "batch": batch, "variant": name, "us_per_layer": micros})
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
