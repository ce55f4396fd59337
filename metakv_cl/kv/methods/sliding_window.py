"""Sliding window: keep the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from metakv_cl.kv.protocol import TokenSelector, recent_indices
from metakv_cl.kv.registry import register_method


@register_method("sliding_window")
@dataclass
class SlidingWindow(TokenSelector):
    """Keep the last ``budget * tokens`` entries (local attention as a cache policy).

    The window baseline of Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer"
    (2020), and of Xiao et al., "Efficient Streaming Language Models with Attention Sinks"
    (ICLR 2024), where it collapses once the first tokens leave the window.
    """

    def select(self, keys, values, queries, count, *, bias, importance, query_groups):
        return recent_indices(keys.shape[-2], count, keys)
