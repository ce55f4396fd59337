"""Attention functions that let a compacted cache take part in attention.

transformers dispatches attention through ``ALL_ATTENTION_FUNCTIONS`` (``AttentionInterface``)
under the name in ``config._attn_implementation``. This module registers two wrappers,
``"kv_compact_sdpa"`` and ``"kv_compact_eager"``, around the stock sdpa and eager functions, and
the matching mask functions in ``AttentionMaskInterface``. They work for every model that
uses the interface (GPT-2, the Llama family, ...).

The link with the cache: :class:`~metakv_cl.kv.cache.CompactedLayer.update` returns the key
tensor for attention and registers itself as that tensor's owner (:func:`bind_keys`); the
wrapper, called right after with that very key tensor, finds the layer and

* adds the layer's per-entry bias (Attention Matching's beta, the weights of merged entries,
  masked padding) to the attention scores;
* rebuilds the mask when the cache was compacted (entries no longer line up with the 2-D
  attention mask the model built): cached entries are all visible, the new tokens keep the
  model's causal/padding block;
* hands the layer what it asked for: the (scaled, post-RoPE) queries as reference queries,
  and the attention each entry received.
* hands the readout, with the mask it built, to a layer that has a ``memory_attention``
  (the kNN memory of :mod:`metakv_cl.kv.retrieval.knn_attention`, which adds retrieved entries).

Attention over any other cache (or none) goes straight to the stock function, so enabling the
wrappers changes nothing for ordinary use; with no bias and no compaction the stock function
gets the stock arguments and results are bit-identical.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import TYPE_CHECKING, Callable

import torch

from metakv_cl.kv.protocol import AttentionReceived
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from metakv_cl.kv.cache import CompactedLayer

BASE_IMPLEMENTATIONS = ("sdpa", "eager")
PREFIX = "kv_compact_"

_binding = threading.local()


def bind_keys(keys: torch.Tensor, layer: CompactedLayer) -> None:
    """Record that ``keys`` (about to be passed to attention) belong to ``layer``."""
    _binding.current = (weakref.ref(keys), layer)


def _take_layer(keys: torch.Tensor) -> CompactedLayer | None:
    current = getattr(_binding, "current", None)
    if current is None or current[0]() is not keys:
        return None
    _binding.current = None
    return current[1]


def _base_function(module: torch.nn.Module, base: str) -> Callable:
    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no module-level eager_attention_forward; use kv_compact_sdpa")
    return eager


def _new_token_block(mask: torch.Tensor | None, queries: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask among the new tokens [b|1, 1, q, q], or None for plain causal attention."""
    if mask is None:
        return None
    block = mask[..., -queries:]
    if block.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=block.device).masked_fill(~block, torch.finfo(dtype).min).expand(block.shape)
    return block.to(dtype)


def _causal_block(queries: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    future = torch.ones(queries, queries, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(queries, queries, dtype=dtype, device=device).masked_fill(future, torch.finfo(dtype).min)[None, None]


def _cached_columns_all_visible(mask: torch.Tensor | None, cached: int) -> bool:
    """Whether the mask lets every query see every cached column (then alignment does not matter)."""
    if mask is None:
        return True
    columns = mask[..., :cached]
    return bool(columns.all()) if columns.dtype == torch.bool else bool((columns == 0).all())


def _new_token_validity(block: torch.Tensor | None, queries: int) -> torch.Tensor | None:
    """[b, q] True for real tokens (a token attends to itself unless it is padding), or None if all are."""
    if block is None:
        return None
    diagonal = block[:, 0, torch.arange(queries), torch.arange(queries)]
    valid = diagonal > torch.finfo(block.dtype).min / 2
    return None if bool(valid.all()) else valid


def compacted_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    base: str = "sdpa",
    **kwargs,
):
    """Attention over a compacted cache layer (see the module docstring); same contract as the stock functions."""
    base_function = _base_function(module, base)
    layer = _take_layer(key)
    if layer is None:
        return base_function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer.consumed()
    queries, entries = query.shape[-2], key.shape[-2]
    cached = entries - queries
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    groups = query.shape[1] // key.shape[1]

    # The model built its mask for the entries it expected; after a compaction its columns may
    # no longer line up with the entries (a compaction in this very call changes the length).
    resized = attention_mask is not None and attention_mask.shape[-1] != entries
    stale = resized or (layer.mask_is_stale and not _cached_columns_all_visible(attention_mask, cached))
    if queries == 1 and stale:
        block = None  # one generated token: never padding, and stale masks may point at old columns
    else:
        block = _new_token_block(attention_mask, queries, query.dtype)
    if (validity := _new_token_validity(block, queries)) is not None:
        layer.mask_new_tokens(validity)
    if layer.wants_queries:
        real = None if validity is None else validity[:, None, :, None].to(query.dtype)
        layer.add_reference_queries((query * scale) if real is None else query * scale * real, groups)

    bias = layer.attention_bias(cached)
    memory = getattr(layer, "memory_attention", None)  # a kNN memory layer (metakv_cl.kv.retrieval) retrieves too
    if bias is None and not stale and not layer.tracks_attention and memory is None:
        return base_function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    # Additive mask over [cached entries | new tokens]: the layer's bias, then the new-token block.
    new_block = block if block is not None else _causal_block(queries, query.dtype, query.device)
    batch = query.shape[0]
    if bias is None:
        cached_part = torch.zeros(1, 1, 1, cached, dtype=query.dtype, device=query.device)
    else:
        cached_part = bias.to(query.dtype).repeat_interleave(groups, dim=1).unsqueeze(2)
    heads = cached_part.shape[1]  # 1 (shared by all heads) or one row per query head
    mask = torch.cat([cached_part.expand(batch, heads, queries, cached), new_block.expand(batch, heads, queries, queries)], dim=-1)
    if memory is not None:
        return memory(module, query, key, value, mask, scale, dropout, validity)
    if not layer.tracks_attention:
        return base_function(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    # The layer tracks the attention each entry receives: compute the weights explicitly.
    keys_full = key.repeat_interleave(groups, dim=1)
    values_full = value.repeat_interleave(groups, dim=1)
    weights = torch.softmax((query @ keys_full.transpose(-1, -2)) * scale + mask, dim=-1, dtype=torch.float32)
    if validity is not None:
        weights = weights * validity[:, None, :, None]  # padding queries give no attention
    grouped = weights.reshape(batch, key.shape[1], groups * queries, entries)
    latest = weights[:, :, -1].reshape(batch, key.shape[1], groups, entries).mean(dim=2)
    layer.receive_attention(AttentionReceived(total=grouped.sum(dim=2), peak=grouped.amax(dim=2), latest=latest))
    weights = torch.nn.functional.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    output = (weights @ values_full).transpose(1, 2).contiguous()
    return output, weights


def _register() -> None:
    for base in BASE_IMPLEMENTATIONS:
        name = PREFIX + base

        def wrapper(module, query, key, value, attention_mask, scaling=None, dropout=0.0, _base=base, **kwargs):
            return compacted_attention(module, query, key, value, attention_mask, scaling, dropout, base=_base, **kwargs)

        wrapper.__name__ = f"{name}_attention"
        AttentionInterface.register(name, wrapper)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


def enable_compacted_attention(model: torch.nn.Module) -> str:
    """Switch ``model`` to the compacted-cache attention wrapper around its current implementation.

    Args:
        model: a transformers model whose attention goes through ``AttentionInterface``.

    Returns:
        The attention implementation now set (``"kv_compact_sdpa"`` or ``"kv_compact_eager"``).

    Raises:
        ValueError: if the model's current implementation is neither sdpa nor eager (flash or
            flex attention cannot take a per-entry bias here).
    """
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return current
    base = current or "sdpa"
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(f"compacted caches need sdpa or eager attention; this model uses {current!r}")
    model.set_attn_implementation(PREFIX + base)
    return PREFIX + base


def disable_compacted_attention(model: torch.nn.Module) -> str:
    """Restore the stock implementation under the wrapper; returns it."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX):])
    return model.config._attn_implementation
