"""PyramidKV: SnapKV's token choice under layer budgets that shrink from the lowest layer to the highest."""

from __future__ import annotations

from dataclasses import dataclass

from metakv_cl.kv.methods.snapkv import SnapKV
from metakv_cl.kv.registry import register_method


@register_method("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores with layer-wise budgets: lower layers keep more, higher layers less.

    Cai, Zhang, Gao, Liu, Liu, Lu, Hu, Xiao, Tang, Wang, Liu, "PyramidKV: Dynamic KV Cache
    Compression based on Pyramidal Information Funneling" (2024): attention is spread widely in
    the lowest layers and concentrated in the highest, so budgets fall in an arithmetic
    sequence from ``2 - 1/beta`` times the mean budget at the first layer to ``1/beta`` times it
    at the last. A layer cannot keep more than it holds: when the first layer's budget would
    pass 100 % it is 100 % and the last layer's rises to keep the mean (at a 100 % budget
    every layer keeps everything).

    Args:
        beta: how steep the pyramid is (> 1; the paper uses 20).
        window, kernel_size: as :class:`SnapKV`.
    """

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 1.0:
            raise ValueError(f"beta must be > 1, got {self.beta}")

    def layer_share(self, layer: int, layers: int, budget: float) -> float:
        if layers <= 1:
            return 1.0
        bottom = min(2.0 - 1.0 / self.beta, 1.0 / budget)
        top = 2.0 - bottom
        return bottom - (bottom - top) * layer / (layers - 1)
