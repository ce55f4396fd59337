"""Microbenchmark: microseconds per layer of Meta-KV's one-token decoding work, CUDA-graphed.

The torch path (``MetaKVLayer.forward`` plus the in-place state copy) against the fused Triton
kernel (``FusedDecodeStep``) at several ``max_splits`` (programs that share a row's projection),
for 30 SmolLM2-shaped layers (hidden 576, K/V 192, state 64, rank 8), bf16, batch 1 and 32::

    python benchmarks/fused_decode_splits.py          # needs a CUDA GPU
"""

import time

import torch

from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.fused_decode import FusedDecodeStep
from metakv_cl.modeling.meta_kv import MetaKVLayer

LAYERS, DTYPE, DEVICE = 30, torch.bfloat16, "cuda"


def graphed_us_per_layer(step, reps: int = 100) -> float:
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


def main() -> None:
    for source in ("mean", "attentive", "consolidated"):
        for batch in (1, 32):
            layers = [MetaKVLayer(MetaKVConfig(source=source, rank=8, state_dim=64), 576, 192).to(DEVICE, DTYPE) for _ in range(LAYERS)]
            memory = torch.randn(64, device=DEVICE, dtype=DTYPE) if source == "consolidated" else None
            states = [layer(torch.randn(batch, 4, 576, device=DEVICE, dtype=DTYPE), None, None, memory)[1] for layer in layers]
            x = torch.randn(batch, 1, 576, device=DEVICE, dtype=DTYPE)

            def torch_path():
                for layer, state in zip(layers, states):
                    _, new = layer(x, None, state, memory)
                    for target, value in zip(state or (), new or ()):
                        target.copy_(value)

            results = {"torch": graphed_us_per_layer(torch_path)}
            for splits in (1, 3, 9, 32):
                steps = [FusedDecodeStep(layer, max_splits=splits) for layer in layers]
                results[f"fused, {splits} split(s)"] = graphed_us_per_layer(
                    lambda: [step(x, state, memory) for step, state in zip(steps, states)]
                )
            print(f"{source:12} batch {batch:2}: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()) + " us/layer", flush=True)


if __name__ == "__main__":
    main()
