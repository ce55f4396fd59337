"""Random eviction: a uniformly random subset of tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from metakv_cl.kv.protocol import TokenSelector
from metakv_cl.kv.registry import register_method


@register_method("random")
@dataclass
class RandomEviction(TokenSelector):
    """Keep a uniformly random subset of the entries, drawn independently per (batch, KV head).

    The random-subset control of Zweiger, Fu, Guo, Kim, "Fast KV Compaction via Attention
    Matching" (2026): a method that does not beat it is not using its scores.

    Args:
        seed: seed of the method's own generator (successive compactions continue its stream).
    """

    seed: int = 0
    rows_independent: ClassVar[bool] = False  # one generator stream: stacking layers changes the draws
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def select(self, keys, values, queries, count, *, bias, importance, query_groups):
        noise = torch.rand(keys.shape[:3], generator=self._generator).to(keys.device)
        return noise.topk(count, dim=-1).indices
