"""A transformers ``Cache`` that compacts itself with any registered method when it outgrows its budget.

``CompactedCache(method, max_tokens, model=model)`` is a drop-in ``past_key_values``:
``model(...)``, :func:`~metakv_cl.kv.streaming.chunked_prefill` and ``model.generate()`` work
with it and nothing else, for GPT-2 and RoPE models, at any batch size, with or without Meta-KV
(whose hooks modulate K and V before they reach the cache, so the cache stores and compacts the
modulated states).

Layers. The cache is a list of transformers cache layers, one per model layer. Full-attention
layers are :class:`CompactedLayer` objects, laid out like transformers' ``QuantizedLayer``: a float
residual in ``keys``/``values`` and the older, possibly quantized, entries beside it, dequantized
only for the attention call that reads them. Sliding-window and chunked layers
(``config.layer_types``: Gemma 2/3, Mistral with a ``sliding_window``) hold a bounded window
already: they are transformers' own layers for their type, and are never compacted.

Budget. The capacity is ``max_tokens`` full-precision tokens, measured in bytes: a layer's
held bytes (keys, values, quantization scales, per-entry bias) may not exceed
``max_tokens`` times the bytes of one full-precision token. When an update would exceed it,
the layer compacts what it holds, before appending the new tokens, down to
``capacity - max(new tokens, headroom * capacity)``; the compaction method receives that as a
fraction of the held tokens' full-precision size. The headroom batches compactions (one every
``headroom * max_tokens`` decoded tokens instead of one per token). A forward call with more new
tokens than the capacity leaves room for (a prompt longer than the cache) exceeds it while
that call runs. With ``max_tokens=None`` the cache never compacts on its own: it compacts all
layers when :meth:`CompactedCache.compact` is called (one-shot compaction, see
:mod:`metakv_cl.kv.oneshot`). A method's :meth:`~metakv_cl.kv.protocol.KVCompressor.layer_share`
scales each layer's capacity (PyramidKV's layer budgets).

Positions (``position_policy``):

* ``"kept"`` (default for learned absolute positions, GPT-2): a new token's position is the
  number of entries held when it arrives, so positions stay below ``max_tokens + chunk`` and
  a model with ``n_positions`` learned positions reads inputs of any length. This is also what
  GPT-2 and Llama compute by themselves when no ``position_ids`` are given.
* ``"seen"`` (default for RoPE models, the Llama family): a new token's position is the number
  of tokens read so far, as without compaction. Cached RoPE keys keep the rotation of their
  original position, so query-key distances stay true; positions grow past the cache size
  (RoPE has no table to overflow, but quality beyond the trained context is the model's).

A cache built with ``model=`` sets the positions of every forward call that passes it
(:func:`attach_compacted_cache`); otherwise :meth:`CompactedCache.position_ids` gives them (what
the helpers in :mod:`metakv_cl.kv.streaming` pass).

Attention. The per-entry bias, the capture of reference queries and the attention statistics
happen in the attention function of :func:`~metakv_cl.kv.attention.enable_compacted_attention`,
which ``model=`` (or a helper) switches the model to. A layer raises if its keys were not
consumed by it, so a bias can never be silently ignored.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from metakv_cl.kv.attention import bind_keys, enable_compacted_attention
from metakv_cl.kv.protocol import (
    MASKED_BIAS,
    AttentionReceived,
    CompactedKV,
    KVCompressor,
    attention_from_queries,
    float32_math,
    gather_tokens,
    validate_budget,
)
from metakv_cl.kv.quantization import KVStorage, QuantizedTensor, owned
from metakv_cl.kv.registry import get_method
from metakv_cl.modeling.families import model_family
from metakv_cl.transformers_api import passed_cache
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs

POSITION_POLICIES = ("auto", "kept", "seen")


class CompactedLayer(DynamicLayer):
    """One full-attention layer of a :class:`CompactedCache`: recent float entries, older compacted storage, a bias.

    The layout is that of transformers' ``QuantizedLayer``: ``keys`` and ``values`` (the
    attributes every cache layer has) hold the float residual, the entries appended since the
    last compaction plus whatever float entries a compaction returned at its end;
    ``quantized_keys`` and ``quantized_values`` hold the older entries as the compaction method
    returned them, up to its last quantized segment. Attention gets both, the older part
    dequantized for that call only: no float copy of quantized entries is kept.

    Attributes:
        keys, values: the float residual [batch, kv_heads, residual entries, head_dim], or None
            before the first update.
        quantized_keys, quantized_values: :class:`~metakv_cl.kv.quantization.KVStorage` of the
            older entries (empty when a compaction returned only float entries).
        bias: per-entry additive attention bias [batch, kv_heads, entries] (float32), or None.
        importance: the method's per-entry attention statistic, when it tracks attention.
        reference_queries: captured queries (pre-scaled, grouped per KV head, token-major), when
            the method needs them [batch, kv_heads, n, head_dim]: the latest ones or a sample
            spread over everything read (the method's ``query_sampling``).
        query_groups: query heads per KV head (rows of ``reference_queries`` per token).
        appended_since_compaction: entries appended since the last compaction, the ones
            :meth:`crop` can take back.
        compactions, compaction_seconds, peak_bytes: statistics.
    """

    # A compaction inside a forward call cannot be undone, so transformers' rollbacks (assisted
    # decoding) must not rely on crop here.
    is_croppable = False

    def __init__(self, cache: CompactedCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self._clear()

    def _clear(self) -> None:
        self.quantized_keys = KVStorage()
        self.quantized_values = KVStorage()
        self.bias: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None
        self.forget_reference_queries()
        self.query_groups = 1
        self.appended_since_compaction = 0
        self.compactions = 0
        self.compaction_seconds = 0.0
        self.peak_bytes = 0
        self.mask_is_stale = False
        self._awaiting_attention = False

    def __repr__(self) -> str:
        return f"CompactedLayer(entries={self.get_seq_length()}, bytes={self.nbytes})"

    # --- the transformers layer interface -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.value_dtype = value_states.dtype  # differs under autocast: RoPE keys come out float32
        # Empty residuals of the right shape, so that batch operations and byte counts need no special case.
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Compact if the new tokens would overflow the budget, append them, return all keys and values.

        Returns:
            (keys, values) [batch, kv_heads, entries, dim] for this call's attention: the residual
            itself when nothing is quantized, else the dequantized older entries followed by it.

        Raises:
            RuntimeError: the keys returned by the previous call never reached the compacted
                attention function (the model's attention was not switched to it).
        """
        if self._awaiting_attention:
            raise RuntimeError(
                "the keys this CompactedCache layer returned last time never reached its attention function: "
                "build the cache with CompactedCache(method, max_tokens, model=model), or call "
                "metakv_cl.kv.enable_compacted_attention(model) first"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._maybe_compact(key_states.shape[-2])
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.appended_since_compaction += key_states.shape[-2]
        if self.bias is not None:
            self.bias = torch.cat([self.bias, self.bias.new_zeros(key_states.shape[:3])], dim=-1)
        if self.cache.method.tracks_attention:
            fresh = self.cache.method.initial_importance(key_states)
            self.importance = fresh if self.importance is None else torch.cat([self.importance, fresh], dim=-1)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        keys, values = self.dequantized()
        self._awaiting_attention = True
        bind_keys(keys, self)
        return keys, values

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All entries as float (keys, values) [batch, kv_heads, entries, dim], made for the caller and not kept.

        With nothing quantized these are the residual tensors themselves (no copy).
        """
        if not self.quantized_keys.segments:
            return self.keys, self.values
        return (torch.cat([self.quantized_keys.to_float(), self.keys], dim=-2),
                torch.cat([self.quantized_values.to_float(), self.values], dim=-2))

    @property
    def key_storage(self) -> KVStorage:
        """All keys as one storage (the older segments, then the residual), sharing the layer's tensors."""
        return KVStorage([*self.quantized_keys.segments, self.keys]) if self.is_initialized else KVStorage()

    @property
    def value_storage(self) -> KVStorage:
        """All values as one storage (the older segments, then the residual), sharing the layer's tensors."""
        return KVStorage([*self.quantized_values.segments, self.values]) if self.is_initialized else KVStorage()

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_keys.seq_len + self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove entries from the end, with the meaning transformers' ``DynamicLayer.crop`` gives the argument.

        A negative ``tokens_to_remove`` removes that many entries; zero removes none. A positive
        one is what the installed transformers makes of it: below 5.18 the number of entries to
        keep (deprecated there), from 5.18 on an error.

        Raises:
            ValueError: the entries to remove include some that a compaction produced (only those
                appended since the last compaction can be taken back), or transformers refuses a
                positive argument.
        """
        held = self.get_seq_length()
        removing = min(held, -tokens_to_remove) if tokens_to_remove <= 0 else max(0, held - tokens_to_remove)
        if removing > self.appended_since_compaction:
            raise ValueError(
                f"cannot crop {removing} entries from a compacted cache layer: only the "
                f"{self.appended_since_compaction} appended since its last compaction can be removed"
            )
        super().crop(tokens_to_remove)
        if removing == 0:
            return
        self.keys, self.values = owned(self.keys), owned(self.values)  # a slice would keep the cropped bytes alive
        self.appended_since_compaction -= removing
        self.bias, self.importance = (None if t is None else owned(t[..., : held - removing])
                                      for t in (self.bias, self.importance))

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.quantized_keys.map_batch(fn)
        self.quantized_values.map_batch(fn)
        self.bias, self.importance, self.reference_queries = (
            None if t is None else fn(t) for t in (self.bias, self.importance, self.reference_queries)
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def _hold(self, key_storage: KVStorage, value_storage: KVStorage) -> None:
        """Hold compacted entries: up to the last quantized segment as storage, the float rest as the residual."""
        self.quantized_keys, self.keys = _split_residual(key_storage, self.keys)
        self.quantized_values, self.values = _split_residual(value_storage, self.values)
        self.appended_since_compaction = 0

    # --- compaction ------------------------------------------------------------------------
    @property
    def full_token_bytes(self) -> int:
        """Bytes of one full-precision token of this layer (all batch rows and KV heads, K and V)."""
        if not self.is_initialized:
            return 0
        batch, heads, _, key_dim = self.keys.shape
        key_bytes, value_bytes = (torch.finfo(dtype).bits // 8 for dtype in (self.dtype, self.value_dtype))
        return batch * heads * (key_dim * key_bytes + self.values.shape[-1] * value_bytes)

    def _maybe_compact(self, incoming: int) -> None:
        cache = self.cache
        held = self.get_seq_length()
        if cache.method.unbounded or cache.max_tokens is None or cache.is_probing or held == 0:
            return
        token_bytes = self.full_token_bytes
        kept_share = min(1.0, cache.max_tokens / max(1, cache.seen_tokens))  # of the tokens read so far
        capacity = cache.max_tokens * token_bytes * cache.method.layer_share(self.layer_idx, cache.layer_count(), kept_share)
        incoming_bytes = incoming * token_bytes
        fraction = 1.0
        if self.nbytes + incoming_bytes > capacity:
            target = capacity - max(incoming_bytes, cache.headroom * capacity)
            fraction = min(1.0, max(target / (held * token_bytes), 1.0 / (2 * held)))
        max_entries = None
        if cache.entry_limit is not None and held + incoming > cache.entry_limit:
            max_entries = max(1, cache.entry_limit - max(incoming, math.ceil(cache.headroom * cache.entry_limit)))
        if fraction < 1.0 or max_entries is not None:
            self.compact(fraction, max_entries)

    def compact(self, budget: float, max_entries: int | None = None, method: KVCompressor | None = None) -> None:
        """Compact this layer to ``budget`` of its held tokens' full-precision size (and at most ``max_entries`` entries).

        Args:
            budget: fraction in (0, 1] of the held tokens' full-precision size to keep.
            max_entries: a cap on the entries kept, or None.
            method: the method to compact with (default: the cache's own); see
                :meth:`compaction_inputs` for what a method that tracks attention receives.

        Raises:
            ValueError: budget outside (0, 1], or a method result of the wrong shape.
        """
        budget = validate_budget(budget)
        if self.get_seq_length() == 0:
            return
        method = self.cache.method if method is None else method
        inputs = self.compaction_inputs(method)
        started = time.perf_counter()
        with float32_math(inputs["keys"].device):  # compaction runs inside the model's forward, under its autocast
            result = method.compact(budget=budget, max_entries=max_entries, **inputs)
        self.compaction_seconds += time.perf_counter() - started
        self.apply_compaction(result, inputs)

    def compaction_inputs(self, method: KVCompressor) -> dict[str, Any]:
        """The keyword arguments of ``method.compact`` for this layer, all but the budget and the cap.

        A method that tracks attention gets the layer's own statistic when it is the cache's
        method; another one gets the attention of the captured reference queries
        (:func:`~metakv_cl.kv.protocol.attention_from_queries`), or None when there are none.
        """
        keys, values = self.dequantized()
        importance = self.importance if method is self.cache.method else None
        if method.tracks_attention and importance is None and self.reference_queries is not None:
            received = attention_from_queries(keys, self.reference_queries, self.bias, self.query_groups)
            importance = method.update_importance(method.initial_importance(keys), received)
        return {"keys": keys, "values": values, "queries": self.reference_queries, "bias": self.bias,
                "importance": importance, "query_groups": self.query_groups}

    def apply_compaction(self, result: CompactedKV, inputs: dict[str, Any]) -> None:
        """Hold ``result``, the compaction of ``inputs`` (from :meth:`compaction_inputs`).

        Raises:
            ValueError: keys, values and bias of different lengths.
        """
        method = self.cache.method
        if result.keys is inputs["keys"] and result.values is inputs["values"]:
            return  # nothing changed
        key_storage, value_storage = KVStorage.wrap(result.keys), KVStorage.wrap(result.values)
        entries = key_storage.seq_len
        if value_storage.seq_len != entries or (result.bias is not None and result.bias.shape[-1] != entries):
            raise ValueError("a compaction returned keys, values and bias of different lengths")
        self._hold(key_storage, value_storage)
        bias = None if result.bias is None else owned(result.bias.float())
        # Entries that carried a bias in may carry an all-zero one out (padding dropped): drop it, so
        # attention takes the stock path. A bias made from none is meant; not checking it saves a host sync.
        carried_zeros = bias is not None and self.bias is not None and not bool(bias.any())
        self.bias = None if carried_zeros else bias
        if method.tracks_attention:
            if result.kept is not None and self.importance is not None:
                self.importance = gather_tokens(self.importance, result.kept)
            else:
                self.importance = method.initial_importance(self.dequantized()[0])
        self.compactions += 1
        self.mask_is_stale = True

    def set_entries(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Replace what the layer holds (for example with a compaction computed offline).

        Args:
            keys, values: [batch, kv_heads, entries, head_dim] float tensors.
            bias: [batch, kv_heads, entries] additive attention bias, or None (an all-zero
                bias is dropped: attention is then exactly the stock one).

        Raises:
            ValueError: inconsistent shapes.
        """
        if keys.dim() != 4 or keys.shape[:3] != values.shape[:3] or (bias is not None and bias.shape != keys.shape[:3]):
            raise ValueError(f"set_entries needs keys/values [b, h, s, d] and bias [b, h, s]; got {tuple(keys.shape)}, "
                             f"{tuple(values.shape)}, {None if bias is None else tuple(bias.shape)}")
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self._hold(KVStorage([keys]), KVStorage([values]))
        self.bias = None if bias is None or not bool(bias.any()) else bias.float()
        if self.cache.method.tracks_attention:
            self.importance = self.cache.method.initial_importance(keys)
        self.mask_is_stale = True

    # --- called by the attention function --------------------------------------------------
    @property
    def wants_queries(self) -> bool:
        return self.cache.method.needs_queries

    @property
    def tracks_attention(self) -> bool:
        return self.cache.method.tracks_attention

    def consumed(self) -> None:
        self._awaiting_attention = False

    def attention_bias(self, cached: int) -> torch.Tensor | None:
        """Bias of the entries held before this call's tokens [batch, kv_heads, cached], or None."""
        return None if self.bias is None else self.bias[..., :cached]

    def mask_new_tokens(self, valid: torch.Tensor) -> None:
        """Mask padding among the tokens just appended (``valid`` [batch, new tokens]) for later calls."""
        if self.bias is None:
            self.bias = torch.zeros(
                *self.keys.shape[:2], self.get_seq_length(),
                device=valid.device,
            )
        new = valid.shape[-1]
        self.bias[..., -new:] = torch.where(valid, 0.0, MASKED_BIAS).unsqueeze(1).to(self.bias.dtype)

    def forget_reference_queries(self) -> None:
        """Drop the captured reference queries (a new sequence, or a repeat-prefill capturing its own)."""
        self.reference_queries: torch.Tensor | None = None
        self._query_tokens_read = 0  # tokens whose queries were offered, for evenly spread sampling
        self._query_stride = 1

    def add_reference_queries(self, queries: torch.Tensor, groups: int) -> None:
        """Keep up to ``cache.reference_queries`` query vectors per KV head (queries [b, heads, q, d], scaled).

        Whole tokens are kept (all ``groups`` query heads of a KV head): the latest ones, or,
        for methods whose ``query_sampling`` is ``"spread"``, the tokens whose index is a
        multiple of a stride that doubles whenever the sample outgrows its room, so the sample
        stays evenly spread over everything read.
        """
        batch, heads, count, dim = queries.shape
        kv_heads = heads // groups
        per_token = queries.reshape(batch, kv_heads, groups, count, dim).transpose(2, 3).detach().float()
        held = None if self.reference_queries is None else self.reference_queries.reshape(batch, kv_heads, -1, groups, dim)
        room = max(1, self.cache.reference_queries // groups)
        if self.cache.method.query_sampling == "spread":
            first = (-self._query_tokens_read) % self._query_stride  # the first new token on the stride
            fresh = per_token[:, :, first :: self._query_stride]
            stacked = fresh if held is None else torch.cat([held, fresh], dim=2)
            while stacked.shape[2] > room:
                stacked = stacked[:, :, ::2]  # tokens 0, s, 2s, ... become 0, 2s, 4s, ...
                self._query_stride *= 2
        else:
            stacked = (per_token if held is None else torch.cat([held, per_token], dim=2))[:, :, -room:]
        self._query_tokens_read += count
        self.query_groups = groups
        self.reference_queries = stacked.reshape(batch, kv_heads, -1, dim).contiguous()

    def receive_attention(self, received: AttentionReceived) -> None:
        self.importance = self.cache.method.update_importance(self.importance, received)

    # --- accounting ------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the cache proper: keys, values (codes, scales, zero points) and bias."""
        if not self.is_initialized:
            return 0
        held = self.quantized_keys.nbytes + self.quantized_values.nbytes + self.keys.nbytes + self.values.nbytes
        return held + (0 if self.bias is None else self.bias.nbytes)

    @property
    def overhead_bytes(self) -> int:
        """Bytes of the bookkeeping beside the cache: attention statistics and reference queries."""
        return sum(t.nbytes for t in (self.importance, self.reference_queries) if t is not None)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor counted by :attr:`nbytes`."""
        if not self.is_initialized:
            return []
        residual = [t for t in (self.keys, self.values) if t.numel() > 0]  # empty tensors hold no bytes
        bias = [] if self.bias is None else [self.bias]
        return self.quantized_keys.tensors() + self.quantized_values.tensors() + residual + bias


def _split_residual(storage: KVStorage, like: torch.Tensor) -> tuple[KVStorage, torch.Tensor]:
    """Split compacted entries after their last quantized segment: (older storage, float residual).

    Args:
        storage: the entries a compaction returned.
        like: a tensor of the layer's batch, heads and dimension (shapes an empty residual).
    """
    quantized = [index for index, segment in enumerate(storage.segments) if isinstance(segment, QuantizedTensor)]
    cut = quantized[-1] + 1 if quantized else 0
    tail = storage.segments[cut:]
    if not tail:
        residual = like.new_empty((*like.shape[:2], 0, like.shape[-1]))
    else:
        residual = tail[0] if len(tail) == 1 else torch.cat(tail, dim=-2)
    return KVStorage(storage.segments[:cut]), owned(residual)


def _stacking_signature(inputs: dict[str, Any]) -> tuple:
    """What layers must share to be compacted in one stacked call: shapes, dtypes and which inputs exist."""
    return tuple((name, None if value is None else (tuple(value.shape), value.dtype, value.device))
                 if isinstance(value, torch.Tensor) or value is None else (name, value)
                 for name, value in sorted(inputs.items()))


class CompactedCache(Cache):
    """A ``Cache`` whose full-attention layers compact themselves with a compaction method (see the module docstring).

    Args:
        method: a registered method name (see :func:`~metakv_cl.kv.registry.available_methods`)
            or a method instance.
        max_tokens: capacity in full-precision tokens, or None: the cache then never compacts on
            its own, only when :meth:`compact` is called (one-shot compaction).
        model: the model the cache serves. Its attention is switched to the compacted-cache
            wrapper and its forward gets positions and a mask from the cache (see
            :func:`attach_compacted_cache`), so that ``model(...)`` and ``model.generate(...)``
            need nothing else. Gives the config too.
        config: the model config, when no model is given (picks the position policy, the
            position limit and which layers are sliding-window layers); the caller then runs
            :func:`~metakv_cl.kv.attention.enable_compacted_attention` and passes positions
            (what the helpers in :mod:`metakv_cl.kv.streaming` do).
        headroom: share of the capacity freed by each compaction beyond the incoming tokens,
            in [0, 1).
        reference_queries: query vectors kept per KV head for methods that need them.
        position_policy: ``"auto"``, ``"kept"`` or ``"seen"`` (see the module docstring).
        **method_kwargs: constructor arguments when ``method`` is a name.

    Raises:
        ValueError: unknown method, bad capacity, headroom or policy, both a model and a config,
            or a model whose attention cannot take the wrapper.
    """

    layer_class: type[CompactedLayer] = CompactedLayer  # what the full-attention layers are

    def __init__(
        self,
        method: str | KVCompressor,
        max_tokens: int | None = None,
        *,
        model: torch.nn.Module | None = None,
        config: Any = None,
        headroom: float = 0.1,
        reference_queries: int = 1024,
        position_policy: str = "auto",
        **method_kwargs: Any,
    ):
        if isinstance(method, str):
            method = get_method(method, **method_kwargs)
        elif method_kwargs:
            raise ValueError("method keyword arguments are only accepted with a method name")
        if not isinstance(method, KVCompressor):
            raise ValueError(f"{type(method).__name__} is not a KVCompressor (the compaction protocol of metakv_cl.kv)")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        if reference_queries < 1:
            raise ValueError(f"reference_queries must be >= 1, got {reference_queries}")
        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"unknown position_policy {position_policy!r}; choose one of {', '.join(POSITION_POLICIES)}")
        if model is not None:
            if config is not None:
                raise ValueError("pass model= or config=, not both (the model's config is used)")
            config = model.config
        super().__init__(layers=[])
        self.method = method
        self.max_tokens = max_tokens
        self.headroom = headroom
        self.reference_queries = reference_queries
        family = None if config is None else model_family(config)
        rope = family is not None and family.rope
        self.position_policy = ("seen" if rope else "kept") if position_policy == "auto" else position_policy
        self.position_limit = None if family is None else family.position_limit(config)
        # Under the "kept" policy positions count entries, so entries are capped as well as bytes
        # (a quantized cache would otherwise hold more entries than the position table).
        self.entry_limit = max_tokens if self.position_policy == "kept" and self.position_limit is not None else None
        self.configured_layers = None if config is None else getattr(config, "num_hidden_layers", None)
        if config is not None:
            self.layers.extend(self._layers_for(config))
        self.seen_tokens = 0
        self._probing = False
        if model is not None:
            attach_compacted_cache(model)

    def _layers_for(self, config: Any) -> list:
        """One layer per model layer: a :class:`CompactedLayer` for full attention, transformers' own layer otherwise.

        Sliding-window (and chunked) attention layers already hold a bounded window; they keep
        transformers' layer for their type, so the model's window mask stays right.
        """
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        if isinstance(layer_kwargs, dict):  # transformers < 5.19 gives one dict for all layers
            layer_kwargs = [layer_kwargs] * len(layer_types)
        return [self.layer_class(self, index) if kind == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
                for index, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs))]

    def __repr__(self) -> str:
        return f"CompactedCache({type(self.method).__name__}, max_tokens={self.max_tokens}, layers={len(self.layers)})"

    @property
    def compacted_layers(self) -> list[CompactedLayer]:
        """The layers this cache compacts (sliding-window layers are left to transformers)."""
        return [layer for layer in self.layers if isinstance(layer, CompactedLayer)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # without a config the layers are made as the model reaches them
            self.layers.append(self.layer_class(self, len(self.layers)))
        if layer_idx == 0 and not self._probing:
            self.seen_tokens += key_states.shape[-2]
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    # --- positions -------------------------------------------------------------------------
    def held_entries(self) -> int:
        """Entries held by the compacted layers (the tokens read, while nothing was compacted)."""
        layers = self.compacted_layers
        return layers[0].get_seq_length() if layers else self.seen_tokens

    def next_position(self) -> int:
        """Position of the next token under the cache's position policy."""
        return self.seen_tokens if self.position_policy == "seen" else self.held_entries()

    def position_ids(self, length: int, batch_size: int = 1, attention_mask: torch.Tensor | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """Positions [batch, length] of the next ``length`` tokens under the cache's position policy.

        Args:
            length: number of new tokens.
            batch_size: rows (ignored when ``attention_mask`` is given).
            attention_mask: [batch, columns] mask whose last ``length`` columns are the new
                tokens; earlier columns are the latest tokens read before them, and tokens read
                before the mask's first column count as real. Padding gets position 0 and is not
                counted, as in transformers' ``generate``.
            device: device of the result.

        Raises:
            ValueError: a mask shorter than ``length``, or covering more tokens than were read.
        """
        if attention_mask is None:
            return (torch.arange(length, device=device) + self.next_position()).unsqueeze(0).expand(batch_size, length)
        columns = attention_mask.shape[-1]
        if not length <= columns <= self.seen_tokens + length:
            raise ValueError(f"attention_mask has {columns} columns; with {length} new tokens and {self.seen_tokens} "
                             f"read before, it must have between {length} and {self.seen_tokens + length}")
        mask = attention_mask.long()
        # Real tokens before the new ones, then the ones the policy does not count (those compacted away).
        before = self.seen_tokens - (columns - length) + mask[:, : columns - length].sum(dim=-1, keepdim=True)
        if self.position_policy == "kept":
            before = before - (self.seen_tokens - self.held_entries())
        new = mask[:, columns - length:]
        return (before + new.cumsum(dim=-1) - 1).masked_fill(new == 0, 0)

    def model_inputs(self, batch_size: int, length: int,
                     attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions and 2-D attention mask for a forward call that adds ``length`` tokens to ``batch_size`` rows.

        The positions follow the position policy (:meth:`position_ids`). A mask that does not
        reach back to the held entries (``generate`` continuing a prefilled cache) is extended
        with visible columns, so that its last columns are the new tokens for the compacted
        layers; masked entries stay masked through the layers' bias.

        Returns:
            (position ids [batch, length], mask or None).
        """
        if attention_mask is None:
            return self.position_ids(length, batch_size), None
        positions = self.position_ids(length, attention_mask=attention_mask, device=attention_mask.device)
        missing = self.held_entries() + length - attention_mask.shape[-1]
        if missing > 0:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], missing), attention_mask], dim=-1)
        return positions, attention_mask

    def check_position_room(self, chunk: int, total: int | None = None) -> None:
        """Raise ValueError if reading more tokens could run past a learned position table.

        Args:
            chunk: the most tokens one forward call will add.
            total: the tokens that will be added in all (checked for an unbounded cache, which
                never frees positions).
        """
        if self.position_policy != "kept" or self.position_limit is None:
            return
        # Positions count held entries: never more than all tokens, nor the capacity plus one chunk.
        bound = math.inf if total is None else self.held_entries() + total
        if self.max_tokens is not None:
            bound = min(bound, self.max_tokens + chunk)
        if bound > self.position_limit:
            raise ValueError(
                f"reading this input could reach position {bound - 1 if bound < math.inf else 'unbounded'}, past the "
                f"model's {self.position_limit} learned positions: lower max_tokens ({self.max_tokens}) or the chunk "
                f"size ({chunk}), or use a compacting method"
            )

    # --- probing and compaction ------------------------------------------------------------
    @property
    def is_probing(self) -> bool:
        return self._probing

    @contextmanager
    def probing(self) -> Iterator[None]:
        """Forward calls inside are probes: no compaction, and their tokens are removed afterwards.

        Used to capture extra reference queries (the repeat-the-context pass of Attention
        Matching) without changing what the cache holds. Sliding-window layers, which drop old
        tokens as they read, get their state from before the probe back.
        """
        if self._probing:
            raise RuntimeError("already probing")
        lengths = [layer.get_seq_length() for layer in self.compacted_layers]
        # transformers' layers replace their tensors on update rather than writing into them
        windows = [(layer, dict(vars(layer))) for layer in self.layers if not isinstance(layer, CompactedLayer)]
        self._probing = True
        try:
            yield
        finally:
            self._probing = False
            for layer, length in zip(self.compacted_layers, lengths):
                layer.crop(length - layer.get_seq_length())
            for layer, state in windows:
                vars(layer).clear()
                vars(layer).update(state)

    def layer_count(self) -> int:
        """Layers of the model (from its config), or the layers created so far when no config was given."""
        return self.configured_layers or len(self.layers)

    def compact(self, budget: float, *, method: str | KVCompressor | None = None,
                batch_layers: bool | None = None) -> None:
        """Compact every layer now, to ``budget`` of its held full-precision size (one-shot compaction).

        Args:
            budget: fraction in (0, 1] kept (times the method's
                :meth:`~metakv_cl.kv.protocol.KVCompressor.layer_share` of each layer).
            method: compact with this method (a name or an instance) instead of the cache's own:
                one prefill can be compacted by every method (see
                :meth:`CompactedLayer.compaction_inputs` for methods that track attention).
            batch_layers: for methods whose ``rows_independent`` is set, stack the layers that
                share shapes and budget along the batch axis and compact them in one call (the
                same result as layer by layer, without a Python loop over layers). None (the
                default) stacks on an accelerator, where one call saves the launches of many
                small ones, and loops on the CPU, where the loop costs nothing to launch and
                stacking costs a copy of every layer's keys and values
                (``benchmarks/compaction_speed.py`` times both).

        Raises:
            ValueError: budget outside (0, 1], or an unknown method.
        """
        budget = validate_budget(budget)
        method = self.method if method is None else get_method(method) if isinstance(method, str) else method
        if batch_layers is None:
            batch_layers = self.on_accelerator()
        batches: dict[Any, list[tuple[CompactedLayer, dict[str, Any]]]] = {}
        for layer in self.compacted_layers:
            layer_budget = min(1.0, budget * method.layer_share(layer.layer_idx, self.layer_count(), budget))
            if layer.get_seq_length() == 0 or layer_budget >= 1.0:
                continue
            if not (batch_layers and method.rows_independent):
                layer.compact(layer_budget, method=method)
                continue
            inputs = layer.compaction_inputs(method)
            batches.setdefault((layer_budget, _stacking_signature(inputs)), []).append((layer, inputs))
        for (layer_budget, _), members in batches.items():
            self._compact_stacked(method, layer_budget, members)

    def on_accelerator(self) -> bool:
        """Whether the held entries live on a device other than the CPU."""
        return any(layer.is_initialized and layer.keys.device.type != "cpu" for layer in self.compacted_layers)

    @staticmethod
    def _compact_stacked(method: KVCompressor, budget: float, members: list[tuple[CompactedLayer, dict[str, Any]]]) -> None:
        """Compact layers of equal shapes in one call, stacked along the batch axis, and hand each its part."""
        first = members[0][1]
        stacked = {name: torch.cat([inputs[name] for _, inputs in members]) if isinstance(value, torch.Tensor) else value
                   for name, value in first.items()}
        started = time.perf_counter()
        with float32_math(first["keys"].device):
            result = method.compact(budget=budget, **stacked)
        seconds = (time.perf_counter() - started) / len(members)
        rows = first["keys"].shape[0]
        for index, (layer, inputs) in enumerate(members):
            part = slice(index * rows, (index + 1) * rows)
            layer.apply_compaction(CompactedKV(*(None if t is None else owned(t[part])
                                                 for t in (result.keys, result.values, result.bias, result.kept))), inputs)
            layer.compaction_seconds += seconds

    # --- accounting ------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held: the compacted layers' keys, values, scales and biases, and the sliding windows."""
        windows = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers
                      if not isinstance(layer, CompactedLayer) and layer.is_initialized)
        return windows + sum(layer.nbytes for layer in self.compacted_layers)

    @property
    def peak_bytes(self) -> int:
        """The compacted layers' peak bytes, summed."""
        return sum(layer.peak_bytes for layer in self.compacted_layers)

    @property
    def overhead_bytes(self) -> int:
        return sum(layer.overhead_bytes for layer in self.compacted_layers)

    def stats(self) -> dict[str, float]:
        """Cache statistics: entries, bytes (current, peak, bookkeeping), compactions and their time."""
        return {
            "entries": self.held_entries(),
            "seen_tokens": self.seen_tokens,
            "bytes": self.nbytes,
            "peak_bytes": self.peak_bytes,
            "overhead_bytes": self.overhead_bytes,
            "compactions": max((layer.compactions for layer in self.compacted_layers), default=0),
            "compaction_seconds": sum(layer.compaction_seconds for layer in self.compacted_layers),
        }


def attach_compacted_cache(model: torch.nn.Module) -> None:
    """Make ``model`` take a :class:`CompactedCache` as a plain ``past_key_values``, in ``model(...)`` and ``generate``.

    Switches its attention to the compacted-cache wrapper
    (:func:`~metakv_cl.kv.attention.enable_compacted_attention`) and adds a forward pre-hook
    that, on calls passing a :class:`CompactedCache`, sets the positions from the cache's
    position policy and extends a 2-D attention mask that does not reach back to the held
    entries (:meth:`CompactedCache.model_inputs`). Positions passed by the caller are replaced:
    the cache knows what it dropped. Calls with another cache, or none, are left alone.
    Attaching twice is attaching once.

    Raises:
        ValueError: the model's attention is neither sdpa nor eager.
    """
    enable_compacted_attention(model)
    if getattr(model, "_compacted_cache_hook", None) is not None:
        return
    signature = inspect.signature(model.forward)

    def positions_from_the_cache(module, args, kwargs):
        cache = passed_cache(signature, args, kwargs)
        if not isinstance(cache, CompactedCache):
            return None
        if len(args) > 1:
            raise TypeError("with a CompactedCache, pass the model's inputs after input_ids by keyword")
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        mask = kwargs.get("attention_mask")
        if tokens is None or (mask is not None and mask.dim() != 2):  # a prepared 4-D mask is the caller's
            return None
        positions, mask = cache.model_inputs(tokens.shape[0], tokens.shape[1], mask)
        return args, {**kwargs, "position_ids": positions.to(tokens.device), "attention_mask": mask}

    model._compacted_cache_hook = model.register_forward_pre_hook(positions_from_the_cache, with_kwargs=True)
