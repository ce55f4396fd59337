"""Attention layouts: where the K and V projections are and how to modulate them.

* :class:`FusedQKV`: one projection produces [Q | K | V] (GPT-2's Conv1D ``c_attn``, Phi-3's
  ``qkv_proj``); only the K and V slices are modulated.
* :class:`SeparateKV`: ``k_proj`` / ``v_proj`` linears (Llama, Mistral, Qwen2), grouped-query
  attention (K and V have num_key_value_heads * head_dim features).
* :class:`NormedK`: separate projections with a per-head norm on K after ``k_proj`` (Gemma 3,
  Qwen3): the K modulation is added after that norm, which would otherwise undo its scale.

An adapter names the modules whose outputs receive the modulation computed for the current
chunk, adds it to those outputs, and adds or subtracts constant weight increments for merging.
Which model type uses which adapter is recorded in :mod:`metakv_cl.modeling.families`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass
class AttentionSite:
    """One self-attention module and the shapes the modulation needs."""

    attention: nn.Module
    hidden_size: int
    kv_size: int
    head_dim: int


def _weight_in_out(projection: nn.Module) -> torch.Tensor:
    """The projection's weight as [d_in, d_out] (a view: Conv1D stores it so, Linear transposed)."""
    return projection.weight if isinstance(projection, Conv1D) else projection.weight.T


class FusedQKV:
    """One projection computes [Q | K | V]; the modulation goes into its K and V slices.

    Args:
        projection: the attention module's attribute holding the fused projection.
    """

    def __init__(self, projection: str):
        self.projection = projection

    def matches(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, self.projection, None), (nn.Linear, Conv1D))

    def site(self, attention: nn.Module) -> AttentionSite:
        if getattr(attention, "is_cross_attention", False):
            raise ValueError("Meta-KV modulates self-attention only; found a cross-attention layer")
        d_in, d_out = _weight_in_out(getattr(attention, self.projection)).shape
        head_dim = attention.head_dim
        query_size = attention.config.num_attention_heads * head_dim
        return AttentionSite(attention, d_in, (d_out - query_size) // 2, head_dim)

    def output_hook_points(self, site: AttentionSite) -> list[tuple[nn.Module, int]]:
        """(module, target) pairs whose outputs receive the modulation; the target is where K starts."""
        projection = getattr(site.attention, self.projection)
        return [(projection, _weight_in_out(projection).shape[1] - 2 * site.kv_size)]

    @staticmethod
    def add_delta(output: torch.Tensor, delta: torch.Tensor, target: int) -> torch.Tensor:
        # In place: the projection's matmul does not keep its output for backward, and a copy of
        # the whole [Q | K | V] tensor would cost more than the modulation itself.
        output[..., target:] += delta.to(output.dtype)
        return output

    @staticmethod
    def output_targets(output: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, V) views of a projection output that the modulation is added into."""
        keys, values = output[..., target:].chunk(2, dim=-1)
        return keys, values

    @torch.no_grad()
    def add_weights(self, site: AttentionSite, increments: torch.Tensor, sign: float) -> None:
        weight = _weight_in_out(getattr(site.attention, self.projection))
        start, size = weight.shape[1] - 2 * site.kv_size, site.kv_size
        weight[:, start : start + size] += sign * increments[0].to(weight.dtype)
        weight[:, start + size :] += sign * increments[1].to(weight.dtype)


class SeparateKV:
    """Separate ``k_proj`` and ``v_proj`` linears: the modulation is added to their outputs."""

    def matches(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj"))

    def site(self, attention: nn.Module) -> AttentionSite:
        head_dim = getattr(attention, "head_dim", None) or attention.q_proj.out_features // attention.config.num_attention_heads
        return AttentionSite(attention, attention.k_proj.in_features, attention.k_proj.out_features, head_dim)

    def output_hook_points(self, site: AttentionSite) -> list[tuple[nn.Module, int]]:
        """(module, target) pairs whose outputs receive the modulation; target 0 is K, 1 is V."""
        return [(site.attention.k_proj, 0), (site.attention.v_proj, 1)]

    def add_delta(self, output: torch.Tensor, delta: torch.Tensor, target: int) -> torch.Tensor:
        size = delta.shape[-1] // 2  # [K | V]
        return output + delta[..., target * size : (target + 1) * size].to(output.dtype)

    def output_targets(self, output: torch.Tensor, target: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, V) outputs that the modulation is added into: this projection's target only."""
        return (output, None) if target == 0 else (None, output)

    @torch.no_grad()
    def add_weights(self, site: AttentionSite, increments: torch.Tensor, sign: float) -> None:
        for target, projection in enumerate((site.attention.k_proj, site.attention.v_proj)):
            projection.weight += sign * increments[target].T.to(projection.weight.dtype)  # Linear: [d_out, d_in]


class NormedK(SeparateKV):
    """Separate projections and a per-head norm ``k_norm`` on K after ``k_proj``.

    A modulation added to ``k_proj``'s output would be renormalised, so the K modulation is added
    to ``k_norm``'s output (before RoPE); V has no norm and is modulated as in :class:`SeparateKV`.

    Args:
        heads_first: whether ``k_norm`` sees K as [batch, heads, time, head_dim] (Gemma 3) rather
            than [batch, time, heads, head_dim] (Qwen3).
    """

    def __init__(self, heads_first: bool):
        self.heads_first = heads_first

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) and isinstance(getattr(module, "k_norm", None), nn.Module)

    def output_hook_points(self, site: AttentionSite) -> list[tuple[nn.Module, int]]:
        return [(site.attention.k_norm, 0), (site.attention.v_proj, 1)]

    def add_delta(self, output: torch.Tensor, delta: torch.Tensor, target: int) -> torch.Tensor:
        if target == 1:
            return super().add_delta(output, delta, target)
        # [batch, time, heads, head_dim]
        keys = delta[..., : delta.shape[-1] // 2].unflatten(-1, (-1, output.shape[-1]))
        return output + (keys.transpose(1, 2) if self.heads_first else keys).to(output.dtype)

    def output_targets(self, output: torch.Tensor, target: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if target == 1:
            return None, output
        keys = output.transpose(1, 2) if self.heads_first else output
        return keys.view(*keys.shape[:2], -1), None  # a view: the fused kernel adds into it in place

    def add_weights(self, site: AttentionSite, increments: torch.Tensor, sign: float) -> None:
        raise ValueError(
            "Meta-KV cannot be merged into this model: it normalises K after k_proj (k_norm), and the K "
            "modulation, added after that norm, has no equivalent in k_proj's weights; keep Meta-KV unmerged"
        )
