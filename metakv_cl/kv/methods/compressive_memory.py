"""Compressive memory: a FIFO of recent tokens plus mean-pooled blocks of older ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metakv_cl.kv.protocol import CompactedKV, KVCompressor, entries_for_budget, merge_entries, token_weights, weights_to_bias
from metakv_cl.kv.registry import register_method


@register_method("compressive_memory")
@dataclass
class CompressiveMemory(KVCompressor):
    """Recent tokens first-in first-out; tokens leaving the FIFO are mean-pooled ``rate`` at a time.

    Rae, Potapenko, Jayakumar, Lillicrap, "Compressive Transformers for Long-Range Sequence
    Modelling" (ICLR 2020), with mean pooling as the compression function: the cache is
    [compressed slots, recent FIFO]. A compressed slot stands for ``rate`` tokens and carries
    the bias ``log(rate)`` (its attention mass). Each compaction pools the oldest tokens that
    left the FIFO, only as many blocks as the budget needs; when pooling cannot make room any
    more (the memory is full), the oldest slots are discarded, as in the paper. Compressed
    slots are recognised by their bias (weight above one token), so the method keeps no state
    between compactions.

    Args:
        rate: tokens pooled into one compressed slot (>= 2).
        memory_fraction: share of the kept entries that compressed slots may take (the FIFO
            keeps at least the rest).
    """

    rate: int = 4
    memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.rate < 2:
            raise ValueError(f"rate must be >= 2, got {self.rate}")
        if not 0.0 < self.memory_fraction < 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1), got {self.memory_fraction}")

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        tokens = keys.shape[-2]
        count = entries_for_budget(tokens, budget, max_entries)
        fifo = count - math.floor(count * self.memory_fraction)
        weights = token_weights(bias, keys)
        # Compressed slots form the front of the cache; every head shares the layout.
        is_slot = weights.amax(dim=(0, 1)) > 1.0 + 1e-4
        slots = int(is_slot.long().cumprod(dim=0).sum())
        # Pool the oldest raw tokens outside the FIFO, `rate` at a time, only as many blocks as
        # the budget needs (so a slot always stands for `rate` tokens).
        poolable = max(0, tokens - slots - fifo)
        blocks = min(poolable // self.rate, math.ceil(max(0, tokens - count) / (self.rate - 1)))
        raw = tokens - slots - blocks * self.rate
        block_of = torch.arange(blocks * self.rate) // self.rate
        assignment = torch.cat([torch.arange(slots), slots + block_of, slots + blocks + torch.arange(raw)])
        total = slots + blocks + raw
        merged_keys, merged_values, merged_weights = merge_entries(keys, values, weights, assignment, total)
        drop = max(0, total - count)  # when memory is full, discard the oldest entries (slots first)
        return CompactedKV(
            merged_keys[..., drop:, :],
            merged_values[..., drop:, :],
            weights_to_bias(merged_weights[..., drop:]),
        )
