"""Attention-guided dynamic compression: per-token precision and eviction from tracked relevance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from metakv_cl.kv.protocol import MASKED_BIAS, AttentionReceived, CompactedKV, KVCompressor, gather_tokens
from metakv_cl.kv.quantization import SUPPORTED_BITS, KVStorage, quantize
from metakv_cl.kv.registry import register_method


@register_method("dynamic_precision")
@dataclass
class AttentionGuidedPrecision(KVCompressor):
    """Relevance-ranked mixed precision: important tokens keep more bits, the least relevant are evicted.

    Follows the attention-guided mixed-precision line of Yang et al., "No Token Left Behind:
    Reliable KV Cache Compression via Importance-Aware Mixed Precision Quantization" (MiKV,
    2024) and Dong et al., "QAQ: Quality Adaptive Quantization for LLM KV Cache" (2024), with
    the relevance signal of Zhang et al., "H2O" (NeurIPS 2023) made recency-aware:

    * relevance: each forward call, a token's received attention is max-pooled over the call's
      queries and the query heads of its KV head; relevance is an exponential moving average
      of that (``relevance <- decay * relevance + (1 - decay) * peak``). New tokens start at 1
      (fully relevant) and decay towards what they actually receive, so relevance keeps being
      updated while decoding.
    * precision under the budget (a fraction of full-precision bytes): every token is evicted,
      stored at one of ``bits`` or kept in full precision. Precision is bought greedily where
      it helps most per byte: a step from one level to the next is worth
      ``relevance * (distortion before - distortion after) / extra bytes``, with distortion 1 for
      an evicted token, ``(2**b - 1)**-2`` (the squared quantization step) at ``b`` bits and 0 in
      full precision. The plan is made per relevance rank (relevance averaged over batch rows
      and heads at each rank), so every head stores the same number of tokens at each
      precision; at ``budget = 1`` every token stays in full precision.

    Keys and values are quantized per token (groups of ``group_size`` channels), since a token's
    precision changes from one compaction to the next; promotions between 2, 4 and 8 bits are
    lossless. The stored entries are ordered by precision (full first, then ``bits``),
    chronological within a precision.

    Args:
        bits: the quantized precisions (each 2, 4 or 8).
        decay: EMA decay of relevance per forward call, in [0, 1).
        group_size: channels per quantization group (default: the whole head).
    """

    bits: tuple[int, ...] = (8, 4, 2)
    decay: float = 0.9
    group_size: int | None = None
    tracks_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(self.bits), reverse=True))
        if not self.bits or any(b not in SUPPORTED_BITS for b in self.bits):
            raise ValueError(f"bits must be values from {SUPPORTED_BITS}, got {self.bits}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")

    def initial_importance(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(like.shape[:3], dtype=torch.float32, device=like.device)

    def update_importance(self, importance: torch.Tensor, received: AttentionReceived) -> torch.Tensor:
        return self.decay * importance + (1.0 - self.decay) * received.peak

    def _level_costs(self, key_dim: int, value_dim: int, itemsize: int) -> tuple[list[float], list[float]]:
        """Bytes per token and distortion of each level: evicted, ``bits`` low to high, full precision."""
        groups = key_dim // (self.group_size or key_dim) + value_dim // (self.group_size or value_dim)
        quantized = sorted(self.bits)
        costs = [0.0] + [(key_dim + value_dim) * b / 8 + 2 * itemsize * groups for b in quantized]
        distortions = [1.0] + [(2**b - 1) ** -2 for b in quantized]
        return costs + [float((key_dim + value_dim) * itemsize)], distortions + [0.0]

    def plan(self, rank_relevance: torch.Tensor, allowed: float, costs: list[float], distortions: list[float],
             max_entries: int | None) -> torch.Tensor:
        """Level (index into ``costs``) of every relevance rank [tokens], within ``allowed`` bytes per head."""
        relevance = rank_relevance.double().clamp_min(0.0)
        steps = torch.tensor([(distortions[i] - distortions[i + 1]) / (costs[i + 1] - costs[i]) for i in range(len(costs) - 1)],
                             dtype=torch.float64)
        step_costs = torch.tensor([costs[i + 1] - costs[i] for i in range(len(costs) - 1)], dtype=torch.float64)
        value = (relevance[:, None] * steps[None, :]).flatten()  # [tokens * steps], decreasing within a rank
        order = value.argsort(descending=True, stable=True)
        spent = step_costs.repeat(relevance.shape[0])[order].cumsum(0)
        taken = order[spent <= allowed + 1e-6]
        levels = torch.zeros(relevance.shape[0], dtype=torch.long)
        levels.scatter_add_(0, taken // len(steps), torch.ones_like(taken))
        if max_entries is not None:
            levels[max_entries:] = 0
        if not bool((levels > 0).any()):
            levels[0] = 1  # keep at least the most relevant token
        return levels

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        tokens = keys.shape[-2]
        costs, distortions = self._level_costs(keys.shape[-1], values.shape[-1], keys.element_size())
        relevance = importance if importance is not None else torch.linspace(0, 1, tokens, device=keys.device).expand(keys.shape[:3])
        if bias is not None:
            relevance = relevance.masked_fill(bias <= MASKED_BIAS / 2, float("-inf"))
        ranked_relevance, ranked = relevance.sort(dim=-1, descending=True, stable=True)
        rank_relevance = ranked_relevance.clamp_min(0.0).mean(dim=(0, 1)).cpu()
        levels = self.plan(rank_relevance, budget * tokens * costs[-1], costs, distortions, max_entries)
        quantized = sorted(self.bits)
        key_parts, value_parts, kept_parts = [], [], []
        for level in range(len(costs) - 1, 0, -1):  # full precision first
            members = (levels == level).nonzero().squeeze(-1)
            if members.numel() == 0:
                continue
            indices = ranked[..., members.to(ranked.device)].sort(dim=-1).values
            level_keys, level_values = gather_tokens(keys, indices), gather_tokens(values, indices)
            if level < len(costs) - 1:
                bits = quantized[level - 1]
                level_keys = quantize(level_keys, bits, axis="token", group_size=self.group_size)
                level_values = quantize(level_values, bits, axis="token", group_size=self.group_size)
            key_parts.append(level_keys)
            value_parts.append(level_values)
            kept_parts.append(indices)
        kept = torch.cat(kept_parts, dim=-1)
        return CompactedKV(KVStorage(key_parts), KVStorage(value_parts), None if bias is None else gather_tokens(bias, kept), kept)
