"""Moving-average summary: one exponentially averaged slot for evicted tokens, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metakv_cl.kv.protocol import CompactedKV, KVCompressor, entries_for_budget, merge_entries, token_weights, weights_to_bias
from metakv_cl.kv.registry import register_method


@register_method("moving_average")
@dataclass
class MovingAverageSummary(KVCompressor):
    """Summarize evicted tokens into one slot, an exponential moving average of their keys and values.

    The fixed-size summary-memory baseline: the cache is [summary, recent window], where the
    summary is the pooled memory of Rae, Potapenko, Jayakumar, Lillicrap, "Compressive
    Transformers for Long-Range Sequence Modelling" (ICLR 2020) taken to a single slot, and
    weighted towards recently evicted tokens. Each evicted token enters the average with weight
    1 and every later evicted token multiplies the older weights by ``decay``. The slot's bias is
    ``log`` of its total weight, so it draws the attention mass of that many tokens
    (proportional attention, Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).
    The weight lives in the bias, so successive compactions continue the same average without
    any extra state: the first entry is the previous summary (or, at the first compaction,
    simply the oldest token, weight 1).

    Args:
        decay: per-token decay of older evicted tokens, in (0, 1]; 1 is a cumulative average.
    """

    decay: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        tokens = keys.shape[-2]
        window = entries_for_budget(tokens, budget, max_entries) - 1
        evicted = tokens - window
        weights = token_weights(bias, keys)
        # Age of each evicted entry = evicted entries after it; older ones decay more.
        age = torch.arange(evicted - 1, -1, -1, device=keys.device, dtype=torch.float32)
        weights[..., :evicted] = weights[..., :evicted] * self.decay**age
        assignment = torch.cat([torch.zeros(evicted, dtype=torch.long), torch.arange(1, window + 1)])
        merged_keys, merged_values, slot_weights = merge_entries(keys, values, weights, assignment, window + 1)
        return CompactedKV(merged_keys, merged_values, weights_to_bias(slot_weights))
