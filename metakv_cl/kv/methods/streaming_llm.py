"""Attention sinks plus a recent window (StreamingLLM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metakv_cl.kv.protocol import TokenSelector, recent_indices
from metakv_cl.kv.registry import register_method


@register_method("sinks_window")
@dataclass
class SinksWindow(TokenSelector):
    """Keep the first ``sinks`` tokens (attention sinks) and the most recent ones.

    Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks"
    (StreamingLLM, ICLR 2024): softmax dumps attention on the first tokens, so keeping a few of
    them keeps the model stable when the window slides. Entries keep chronological order, so
    the first entries of the cache stay the original first tokens across compactions.

    Args:
        sinks: number of initial tokens kept (at most half of the kept entries).
    """

    sinks: int = 4

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def select(self, keys, values, queries, count, *, bias, importance, query_groups):
        tokens = keys.shape[-2]
        sinks = min(self.sinks, count // 2)
        first = torch.arange(sinks, device=keys.device).expand(*keys.shape[:2], sinks)
        return torch.cat([first, recent_indices(tokens, count - sinks, keys)], dim=-1)
