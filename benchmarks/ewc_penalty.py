"""Microbenchmark: milliseconds per training step of EWC's penalty, forward and backward.

The penalty ``sum F (theta - theta*)^2`` over every parameter tensor of a model, computed as
per-tensor autograd expressions (the textbook form, about ten kernel launches per tensor and
step) against :class:`~metakv_cl.strategies.plugins.ewc.QuadraticPenalty` (multi-tensor kernels in both
directions). On SmolLM2-135M's 272 tensors::

    python benchmarks/ewc_penalty.py --model smollm2-135m --device cuda
    python benchmarks/ewc_penalty.py --model gpt2 --device cpu        # randomly initialised GPT-2 124M
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metakv_cl.hub import load_causal_lm
from metakv_cl.strategies.plugins.ewc import QuadraticPenalty


def per_tensor(anchors, fisher, parameters) -> torch.Tensor:
    return sum((f * (p - a) ** 2).sum() for a, f, p in zip(anchors, fisher, parameters))


def multi_tensor(anchors, fisher, parameters) -> torch.Tensor:
    return QuadraticPenalty.apply(anchors, fisher, *parameters)


def milliseconds(penalty, anchors, fisher, parameters, device: torch.device, reps: int) -> float:
    """Mean time of ``penalty(...).backward()``, the device synchronised around the repetitions."""
    for _ in range(3):
        penalty(anchors, fisher, parameters).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        penalty(anchors, fisher, parameters).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (offline pretrained) or gpt2 (random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = load_causal_lm(args.model, from_scratch=args.model == "gpt2").to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=device).manual_seed(0)
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, generator=generator, device=device) for p in parameters]
    fisher = [torch.rand(p.shape, generator=generator, device=device) for p in parameters]
    rows = {name: milliseconds(penalty, anchors, fisher, parameters, device, args.reps)
            for name, penalty in (("per-tensor autograd", per_tensor), ("QuadraticPenalty", multi_tensor))}
    result = {"model": args.model, "device": str(device), "tensors": len(parameters), "ms_per_step": rows,
              "speed_up": rows["per-tensor autograd"] / rows["QuadraticPenalty"]}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
