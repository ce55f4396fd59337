"""KIVI-style integer quantization: per-channel keys, per-token values, a full-precision residual."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metakv_cl.kv.protocol import CompactedKV, KVCompressor, recent_indices
from metakv_cl.kv.quantization import SUPPORTED_BITS, KVStorage, quantize
from metakv_cl.kv.registry import register_method


@register_method("int8", bits=8)
@register_method("int4", bits=4)
@dataclass
class KIVIQuantization(KVCompressor):
    """Uniform integer quantization of the cache, the KIVI layout.

    Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu, "KIVI: A Tuning-Free Asymmetric 2bit
    Quantization for KV Cache" (ICML 2024): keys have outlier channels, so they are quantized
    per channel over groups of ``group_size`` tokens; values are quantized per token; the most
    recent tokens (a partial group plus ``residual`` tokens) stay in full precision.

    The budget is a fraction of the full-precision bytes (at ``budget = 1`` nothing is
    quantized). Every complete group outside the residual is quantized, as in the paper
    (``quantize_all=False`` quantizes only as many groups, oldest first, as the budget needs);
    if the budget is below what quantizing achieves, the oldest groups are evicted (and then the
    oldest full-precision tokens), so the method degrades into a quantized sliding window.
    Groups stay aligned with the first cached token, so re-quantizing stored groups is exact.

    Args:
        bits: 8 or 4 (the registry names ``int8`` and ``int4``); 2 also works.
        group_size: tokens per key quantization group.
        residual: recent tokens always kept in full precision (beside the partial group).
        quantize_all: quantize every complete group (KIVI), or only what the budget needs.
    """

    bits: int = 8
    group_size: int = 32
    residual: int = 32
    quantize_all: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < 1 or self.residual < 0:
            raise ValueError(f"group_size must be >= 1 and residual >= 0, got {self.group_size} and {self.residual}")

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        tokens, key_dim, value_dim = keys.shape[-2], keys.shape[-1], values.shape[-1]
        itemsize = keys.element_size()
        full = (key_dim + value_dim) * itemsize  # bytes of one token of one head
        # Per token: packed codes, key scale/zero per channel per group, value scale/zero per token.
        packed = (key_dim + value_dim) * self.bits / 8 + 2 * key_dim * itemsize / self.group_size + 2 * itemsize
        allowed = budget * tokens * full
        # An entry cap evicts the oldest whole groups first, keeping groups aligned.
        start = 0
        if max_entries is not None and tokens > max_entries:
            start = min(tokens - max_entries + (-(tokens - max_entries)) % self.group_size, tokens - 1)
        present = tokens - start
        groups = max(0, present - self.residual) // self.group_size
        excess = present * full - allowed

        group_saving = self.group_size * (full - packed)
        if self.quantize_all:
            quantized_groups = groups
        else:
            quantized_groups = min(groups, math.ceil(excess / group_saving)) if excess > 0 else 0
        evicted_groups, evicted_float = 0, 0
        remaining = excess - groups * group_saving
        if quantized_groups == groups and remaining > 1e-9:
            evicted_groups = min(groups, math.ceil(remaining / (self.group_size * packed)))
            remaining -= groups * self.group_size * packed
            if evicted_groups == groups and remaining > 1e-9:
                evicted_float = min(present - groups * self.group_size - 1, math.ceil(remaining / full))

        first = start + evicted_groups * self.group_size
        boundary = start + quantized_groups * self.group_size
        float_start = max(boundary, first + evicted_float)
        key_parts, value_parts = [], []
        if boundary > first:
            key_parts.append(quantize(keys[..., first:boundary, :], self.bits, axis="channel", group_size=self.group_size))
            value_parts.append(quantize(values[..., first:boundary, :], self.bits, axis="token"))
        key_parts.append(keys[..., float_start:, :])
        value_parts.append(values[..., float_start:, :])
        kept = torch.cat([torch.arange(first, boundary, device=keys.device).expand(*keys.shape[:2], -1),
                          recent_indices(tokens, tokens - float_start, keys)], dim=-1)
        kept_bias = None if bias is None else torch.gather(bias, 2, kept)
        return CompactedKV(KVStorage(key_parts), KVStorage(value_parts), kept_bias, kept)
