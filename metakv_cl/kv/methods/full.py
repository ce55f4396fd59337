"""The full cache: the uncompressed baseline every other method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metakv_cl.kv.protocol import CompactedKV, KVCompressor
from metakv_cl.kv.registry import register_method


@register_method("full")
@dataclass
class FullCache(KVCompressor):
    """Keep every token at full precision, whatever the budget (the cache ignores its capacity).

    The reference point of all KV-compression papers, e.g. Xiao et al., "Efficient Streaming
    Language Models with Attention Sinks" (ICLR 2024), and Zhang et al., "H2O: Heavy-Hitter
    Oracle for Efficient Generative Inference of Large Language Models" (NeurIPS 2023).
    """

    unbounded: ClassVar[bool] = True

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        return CompactedKV(keys, values, bias)
