"""Length-bucketed training batches under a token budget (``train_token_budget``).

A padded batch costs ``items x longest item`` token slots. Batching items of similar length,
with as many items per batch as the budget allows, keeps the padding small and the tokens per
step about constant; the number of items per batch varies (the mini-batch size does not apply).
The loss stays the token mean over each batch's label tokens, and padding never changes an
item's loss, so only which items share a step changes, not what an item contributes.

An epoch's batches, deterministic in ``(seed, epoch)`` like a ``DistributedSampler``'s order (so a
fit resumed from an end-of-epoch checkpoint sees the batches an uninterrupted one sees):

1. the items in the epoch's random permutation, stably sorted by length (items of equal length
   land in a new order every epoch);
2. cut into consecutive batches: an item joins the current batch while ``(items + 1) x its
   length`` stays within the budget. An item longer than the budget forms a batch of its own
   (padding it with others would only cost more), so such a batch is the one that exceeds it;
3. under DDP, while the batch count is not a multiple of the process count, the batch with the
   most items is split in two: every item is still seen exactly once per epoch and every process
   takes the same number of steps;
4. the batches in a random order of the epoch (so lengths do not rise over the epoch); process
   ``r`` of ``W`` takes batches ``r, r + W, r + 2W, ...``.

Steps 2 and 3 depend only on the sorted lengths, so the batch sizes, and the number of steps,
are the same every epoch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

from metakv_cl.training.callbacks import derived_seed

OPTION = "train_token_budget"


def check_token_budget(token_budget: int | None) -> None:
    """Refuse a ``train_token_budget`` that is not None or an integer >= 1."""
    if token_budget is None:
        return
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(
            f"{OPTION} must be an integer >= 1 (padded tokens per training batch) or null, got {token_budget!r}"
        )


def plan_batch_sizes(sorted_lengths: Sequence[int], token_budget: int, num_replicas: int = 1) -> list[int]:
    """The item counts of consecutive batches of length-sorted items (steps 2 and 3 above).

    Args:
        sorted_lengths: the items' lengths in ascending order.
        token_budget: most padded tokens (items x longest) per batch.
        num_replicas: DDP processes; the batch count is a multiple of it.

    Returns:
        The number of items in each batch, in order; they sum to ``len(sorted_lengths)``.

    Raises:
        ValueError: no items, or batches of one item each that cannot be shared evenly.
    """
    if not sorted_lengths:
        raise ValueError("cannot batch an empty dataset")
    sizes: list[int] = []
    count = 0
    for length in sorted_lengths:  # ascending: the new item is the longest of its batch
        if count and (count + 1) * length > token_budget:
            sizes.append(count)
            count = 0
        count += 1
    sizes.append(count)
    while len(sizes) % num_replicas:
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[largest] < 2:
            raise ValueError(
                f"{OPTION}={token_budget} gives each of the {len(sorted_lengths)} training items a batch of its own, "
                f"which do not share evenly over {num_replicas} processes; raise {OPTION}"
            )
        half = sizes[largest] // 2
        sizes[largest : largest + 1] = [half, sizes[largest] - half]
    return sizes


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices: items of similar length, within a token budget (module docstring).

    Lightning sets the epoch of ``batch_sampler.sampler`` at every epoch start, so the epoch's
    seeded permutation lives there: :attr:`sampler` is a one-process ``DistributedSampler``,
    whose order for epoch e is the permutation of ``seed + e``.

    Args:
        lengths: each item's length (tokens in its padded sequence).
        token_budget: most padded tokens (items x longest) per batch.
        num_replicas: DDP processes.
        rank: this process.
        seed: shuffling seed.
    """

    def __init__(
        self, lengths: Sequence[int], token_budget: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ):
        check_token_budget(token_budget)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.lengths = [int(length) for length in lengths]
        self.token_budget, self.num_replicas, self.rank, self.seed = token_budget, num_replicas, rank, seed
        self.batch_sizes = plan_batch_sizes(sorted(self.lengths), token_budget, num_replicas)
        self.sampler = DistributedSampler(range(len(self.lengths)), num_replicas=1, rank=0, shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Use the batches of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.sampler.set_epoch(epoch)

    def epoch_batches(self) -> list[list[int]]:
        """All processes' batches of the current epoch, in the order they are taken."""
        by_length = sorted(self.sampler, key=self.lengths.__getitem__)  # stable: equal lengths stay shuffled
        batches, start = [], 0
        for size in self.batch_sizes:
            batches.append(by_length[start : start + size])
            start += size
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.sampler.epoch, "batch order"))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the batches are drawn at the first ``next``, so an epoch set after the
        # iterator was made still counts (Lightning makes a resumed fit's iterator first)
        yield from self.epoch_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return len(self.batch_sizes) // self.num_replicas
