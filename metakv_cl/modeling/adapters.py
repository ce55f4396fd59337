"""Per-architecture adapters: where the K and V projections are and how to modulate them.

* GPT-2 family: one fused ``c_attn`` Conv1D produces [Q | K | V]; only the K and V slices
  are modulated.
* Llama family (Llama, SmolLM2, Qwen2/3, Mistral, ...): separate ``k_proj`` / ``v_proj``
  linears, grouped-query attention (K and V have num_key_value_heads * head_dim features).

An adapter names the modules whose outputs receive the modulation computed for the current
chunk, adds it to those outputs, and adds or subtracts constant weight increments for merging.
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


class GPT2Adapter:
    """GPT-2: modulate the K and V slices of the fused ``c_attn`` projection."""

    name = "gpt2"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(getattr(module, "c_attn", None), Conv1D) and hasattr(module, "split_size")

    @staticmethod
    def site(attention: nn.Module) -> AttentionSite:
        if getattr(attention, "is_cross_attention", False):
            raise ValueError("Meta-KV modulates self-attention only; found a GPT-2 cross-attention layer")
        return AttentionSite(attention, attention.embed_dim, attention.embed_dim, attention.head_dim)

    @staticmethod
    def output_hook_points(site: AttentionSite) -> list[tuple[nn.Module, int | None]]:
        """(module, target) pairs whose outputs receive the modulation; None = K and V fused."""
        return [(site.attention.c_attn, None)]

    @staticmethod
    def add_delta(output: torch.Tensor, delta: torch.Tensor, target: int | None) -> torch.Tensor:
        size = output.shape[-1] // 3  # [Q | K | V]
        # In place: c_attn's matmul does not keep its output for backward, and a copy of the
        # whole [Q | K | V] tensor would cost more than the modulation itself.
        output[..., size:] += delta.to(output.dtype)
        return output

    @staticmethod
    def output_targets(output: torch.Tensor, target: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, V) views of a projection output that the modulation is added into."""
        size = output.shape[-1] // 3
        return output[..., size : 2 * size], output[..., 2 * size :]

    @staticmethod
    @torch.no_grad()
    def add_weights(site: AttentionSite, increments: torch.Tensor, sign: float) -> None:
        weight = site.attention.c_attn.weight  # Conv1D: [d_in, 3 d], y = x W + b
        size = site.kv_size
        weight[:, size : 2 * size] += sign * increments[0].to(weight.dtype)
        weight[:, 2 * size :] += sign * increments[1].to(weight.dtype)


class LlamaAdapter:
    """Llama family: modulate the outputs of ``k_proj`` and ``v_proj``."""

    name = "llama"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj"))

    @staticmethod
    def site(attention: nn.Module) -> AttentionSite:
        head_dim = getattr(attention, "head_dim", None) or attention.q_proj.out_features // attention.config.num_attention_heads
        return AttentionSite(attention, attention.k_proj.in_features, attention.k_proj.out_features, head_dim)

    @staticmethod
    def output_hook_points(site: AttentionSite) -> list[tuple[nn.Module, int | None]]:
        return [(site.attention.k_proj, 0), (site.attention.v_proj, 1)]

    @staticmethod
    def add_delta(output: torch.Tensor, delta: torch.Tensor, target: int | None) -> torch.Tensor:
        size = delta.shape[-1] // 2  # [K | V]
        return output + delta[..., target * size : (target + 1) * size].to(output.dtype)

    @staticmethod
    def output_targets(output: torch.Tensor, target: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, V) outputs that the modulation is added into: this projection's target only."""
        return (output, None) if target == 0 else (None, output)

    @staticmethod
    @torch.no_grad()
    def add_weights(site: AttentionSite, increments: torch.Tensor, sign: float) -> None:
        for target, projection in enumerate((site.attention.k_proj, site.attention.v_proj)):
            projection.weight += sign * increments[target].T.to(projection.weight.dtype)  # Linear: [d_out, d_in]


ADAPTERS = (GPT2Adapter, LlamaAdapter)


def find_attention_sites(model: nn.Module):
    """The adapter for ``model`` and its self-attention sites, in layer order.

    Raises:
        ValueError: if no supported attention layout is found.
    """
    for adapter in ADAPTERS:
        modules = [module for module in model.modules() if adapter.matches(module)]
        if modules:
            return adapter, [adapter.site(module) for module in modules]
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: Meta-KV supports GPT-2-style fused c_attn "
        "attention and Llama-style q_proj/k_proj/v_proj attention (Llama, SmolLM2, Qwen2/3, Mistral)"
    )
