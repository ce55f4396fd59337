"""H2O: heavy hitters (most attended tokens) plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from metakv_cl.kv.protocol import MASKED_BIAS, TokenSelector, recent_indices
from metakv_cl.kv.registry import register_method


@register_method("h2o")
@dataclass
class H2O(TokenSelector):
    """Keep the tokens with the largest accumulated attention ("heavy hitters") and a recent window.

    Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen, "H2O: Heavy-Hitter
    Oracle for Efficient Generative Inference of Large Language Models" (NeurIPS 2023). The cache
    accumulates, per KV head, the attention every entry receives from every query (the default
    :meth:`update_importance`); eviction keeps the top scorers outside the recent window.

    Args:
        recent_fraction: share of the kept entries reserved for the most recent tokens (the
            paper uses half).
    """

    recent_fraction: float = 0.5
    tracks_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {self.recent_fraction}")

    def select(self, keys, values, queries, count, *, bias, importance, query_groups):
        tokens = keys.shape[-2]
        recent = min(count, max(1, round(count * self.recent_fraction)))
        heavy = count - recent
        window = recent_indices(tokens, recent, keys)
        if heavy == 0:
            return window
        scores = importance.clone() if importance is not None else torch.zeros(keys.shape[:3], device=keys.device)
        if bias is not None:
            scores = scores.masked_fill(bias <= MASKED_BIAS / 2, float("-inf"))
        scores[..., tokens - recent :] = float("-inf")  # already kept by the window
        return torch.cat([scores.topk(heavy, dim=-1).indices, window], dim=-1)
