"""Cumulative-average summary: one slot holding the plain mean of every evicted token."""

from __future__ import annotations

from dataclasses import dataclass, field

from metakv_cl.kv.methods.moving_average import MovingAverageSummary
from metakv_cl.kv.registry import register_method


@register_method("cumulative_average")
@dataclass
class CumulativeAverageSummary(MovingAverageSummary):
    """The moving-average summary with no decay: the exact running mean of all evicted tokens.

    The prefix-averaging baseline of Rae et al., "Compressive Transformers for Long-Range
    Sequence Modelling" (ICLR 2020; mean pooling as the compression function, here over the
    whole evicted prefix). The slot's bias is ``log(count)``, so it carries the attention mass of
    every token it replaced.
    """

    decay: float = field(default=1.0, init=False)
