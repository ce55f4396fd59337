"""Work strategies do outside ``Trainer.fit``: passes over an experience's data on every rank.

Between fits (a Fisher estimate, a teacher snapshot) each DDP rank processes its own shard of
the data and the partial sums are all-reduced, so every rank ends with the same result.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def distributed_world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def is_global_zero() -> bool:
    """Whether this process is rank 0 (true outside distributed runs, and before they start)."""
    world, rank = distributed_world()
    if world > 1:
        return rank == 0
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op without a process group) and return it."""
    world, _ = distributed_world()
    if world > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def shard_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """A loader over this rank's shard of ``dataset`` (in order, no repeats across ranks)."""
    world, rank = distributed_world()
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=getattr(dataset, "collate_fn", None))


def compute_device(trainer_kwargs: dict[str, Any]) -> torch.device:
    """The device the fits of these Trainer arguments run on (for passes between fits)."""
    accelerator = str(trainer_kwargs.get("accelerator", "auto"))
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Move ``module`` to ``device`` for the block and back to where it was afterwards."""
    previous = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(previous)
