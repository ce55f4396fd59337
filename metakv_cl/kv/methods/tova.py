"""TOVA: keep the tokens the current query attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from metakv_cl.kv.protocol import MASKED_BIAS, AttentionReceived, TokenSelector, recent_indices
from metakv_cl.kv.registry import register_method


@register_method("tova")
@dataclass
class TOVA(TokenSelector):
    """Token Omission Via Attention: rank entries by the attention of the latest query, averaged over heads.

    Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs" (EMNLP 2024). A
    token's score is the attention the most recent query gives it, averaged over all heads of
    the layer (the paper's choice over per-head scores), so every head keeps the same tokens;
    the score is replaced, not accumulated, at every forward call. Entries the latest query has
    not scored (none before the first call) rank as recent.
    """

    tracks_attention: ClassVar[bool] = True

    def update_importance(self, importance: torch.Tensor, received: AttentionReceived) -> torch.Tensor:
        return received.latest

    def select(self, keys, values, queries, count, *, bias, importance, query_groups):
        if importance is None:
            return recent_indices(keys.shape[-2], count, keys)
        scores = importance.mean(dim=1, keepdim=True).expand_as(importance)
        if bias is not None:
            scores = scores.masked_fill(bias <= MASKED_BIAS / 2, -1.0)
        return scores.topk(count, dim=-1).indices
