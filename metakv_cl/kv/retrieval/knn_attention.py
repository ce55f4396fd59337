"""kNN attention memory: evicted cache entries go to FAISS stores, and attention retrieves from them.

Wu, Rabe, Hutchins, Szegedy, "Memorizing Transformers" (ICLR 2022): a layer keeps the keys and
values that leave its local context in an external memory; each query retrieves its top-k keys
by inner product and attends to them beside the local context. Here the local context is a
:class:`~metakv_cl.kv.cache.CompactedCache` under any compaction method, and the memory takes
what the method throws away:

* a score-and-keep method (sliding window, sinks, H2O, ...) drops tokens: they go to memory;
* a merge or construct method (averages, compressive memory, Attention Matching) replaces every
  entry it was given: all of them go to memory, and the compacted entries stay local.

Each chosen layer keeps one store per batch row and KV head (query heads that share a KV head
under grouped-query attention search the same store, each with its own query). A stored entry
carries its attention bias (padding, merge weights), folded into the search as one more
coordinate, so ``[q * scale, 1] . [k, bias]`` ranks entries exactly by their attention score.

The two readouts:

* ``combine="softmax"``: local and retrieved entries share one softmax. With ``top_k`` at least
  the memory's size and a method that drops tokens unchanged (sliding window, sinks, H2O), this
  is exactly the attention of the full cache (tested on GPT-2 and Llama; GPT-2 under
  ``position_policy="seen"``, which numbers positions as the full cache does);
* ``combine="gate"``: two softmaxes mixed by a gate g per query head,
  ``g * local + (1 - g) * memory``. g is a fixed number or a tensor [attention heads] in [0, 1]
  (pass ``torch.sigmoid(parameter)`` to learn it, as the paper's per-head gate).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch

from metakv_cl.kv.cache import CompactedCache, CompactedLayer
from metakv_cl.kv.protocol import AttentionReceived, CompactedKV, KVCompressor, gather_tokens
from metakv_cl.kv.registry import get_method
from metakv_cl.kv.retrieval.datastore import Datastore

COMBINE_MODES = ("softmax", "gate")
# CompactedCache's own keyword arguments; KNNMemoryCache passes the others to the method.
CACHE_ARGUMENTS = ("model", "config", "headroom", "reference_queries", "position_policy")
MEMORY_INDEX_KINDS = ("flat", "hnsw")  # an IVF store trains on its first batch; evictions come in small ones
# Bias floor of a search vector: a padding entry's bias (MASKED_BIAS, the float32 minimum) would
# swamp the other coordinates of an approximate index.
SEARCH_BIAS_FLOOR = -1e4


class EvictionRecorder(KVCompressor):
    """A compaction method that records each call, so the cache layer can store what the method dropped.

    Args:
        method: the method that compacts.

    Attributes:
        last: ``(keys, values, bias, result)`` of the latest compaction, or None; the layer
            reads and clears it.
    """

    # one call per layer: stacked layers would hand a layer's store another layer's departures
    rows_independent = False

    def __init__(self, method: KVCompressor):
        self.method = method
        self.tracks_attention = method.tracks_attention
        self.needs_queries = method.needs_queries
        self.unbounded = method.unbounded
        self.query_sampling = method.query_sampling
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, CompactedKV] | None = None

    def __repr__(self) -> str:
        return f"EvictionRecorder({self.method!r})"

    def compact(self, keys, values, queries, budget, *, bias=None, importance=None, max_entries=None,
                query_groups=1) -> CompactedKV:
        result = super().compact(keys, values, queries, budget, bias=bias, importance=importance,
                                 max_entries=max_entries, query_groups=query_groups)
        self.last = (keys, values, bias, result)
        return result

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        return self.method._compact(keys, values, queries, budget, bias=bias, importance=importance,
                                    max_entries=max_entries, query_groups=query_groups)

    def initial_importance(self, like: torch.Tensor) -> torch.Tensor:
        return self.method.initial_importance(like)

    def update_importance(self, importance: torch.Tensor, received: AttentionReceived) -> torch.Tensor:
        return self.method.update_importance(importance, received)

    def layer_share(self, layer: int, layers: int, budget: float) -> float:
        return self.method.layer_share(layer, layers, budget)


def departed_indices(kept: torch.Tensor | None, held: int, like: torch.Tensor) -> torch.Tensor:
    """Indices [batch, kv_heads, gone] of the held entries a compaction did not keep, in chronological order.

    Args:
        kept: the kept input indices [batch, kv_heads, entries] of a score-and-keep method, or
            None when the method replaced every entry (then all of them are gone).
        held: entries the compaction was given.
        like: a [batch, kv_heads, ...] tensor on the right device.
    """
    if kept is None:
        return torch.arange(held, device=like.device).expand(*like.shape[:2], held)
    leaving = torch.ones(*like.shape[:2], held, dtype=torch.bool, device=like.device)
    leaving.scatter_(2, kept, False)
    gone = held - kept.shape[-1]
    # Each (batch, head) keeps the same number of entries, so the departed ones form a rectangle.
    order = leaving.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :gone]
    return order.sort(dim=-1).values


class KNNMemoryLayer(CompactedLayer):
    """A :class:`~metakv_cl.kv.cache.CompactedLayer` whose evicted entries go to a kNN memory (see the module docstring).

    Attributes:
        memory_keys, memory_values: the evicted entries [batch, kv_heads, memory, head_dim], or None.
        memory_bias: their attention bias [batch, kv_heads, memory] (float32), or None.
        stores: one :class:`Datastore` per batch row and KV head (row-major), searched by inner product.
        retrieval_seconds: time spent searching the stores.
    """

    cache: KNNMemoryCache

    def _clear(self) -> None:
        super()._clear()
        self.memory_keys: torch.Tensor | None = None
        self.memory_values: torch.Tensor | None = None
        self.memory_bias: torch.Tensor | None = None
        self.stores: list[Datastore] = []
        self.retrieval_seconds = 0.0

    @property
    def uses_memory(self) -> bool:
        """Whether this layer is one of the cache's memory layers."""
        return self.cache.memory_layers is None or self.layer_idx in self.cache.memory_layers

    @property
    def memory_size(self) -> int:
        return 0 if self.memory_keys is None else self.memory_keys.shape[-2]

    @property
    def memory_attention(self):
        """The attention readout over local and retrieved entries, or None while there is nothing to retrieve."""
        return self.attend_with_memory if self.uses_memory and self.memory_size > 0 else None

    @property
    def memory_nbytes(self) -> int:
        """Bytes of the memory's keys, values and bias (each store holds a float32 copy of the keys besides)."""
        tensors = (self.memory_keys, self.memory_values, self.memory_bias)
        return sum(t.nbytes for t in tensors if t is not None) + sum(store.nbytes for store in self.stores)

    # --- filling the memory ------------------------------------------------------------------
    def compact(self, budget: float, max_entries: int | None = None, method: KVCompressor | None = None) -> None:
        # another method (one-shot compaction by name) is recorded too, so its departures are kept
        recorder = self.cache.method if method is None else (
            method if isinstance(method, EvictionRecorder) else EvictionRecorder(method))
        recorder.last = None
        super().compact(budget, max_entries, method=None if method is None else recorder)
        if recorder.last is not None and self.uses_memory:
            keys, values, bias, result = recorder.last
            gone = departed_indices(result.kept, keys.shape[-2], keys)
            if gone.shape[-1] > 0:
                departed_bias = None if bias is None else gather_tokens(bias, gone)
                self.remember(gather_tokens(keys, gone), gather_tokens(values, gone), departed_bias)
        recorder.last = None

    def remember(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Append entries to the memory and its stores.

        Args:
            keys, values: [batch, kv_heads, entries, head_dim].
            bias: their attention bias [batch, kv_heads, entries], or None (zero).

        Raises:
            ValueError: shapes that disagree with each other or with the memory.
        """
        if keys.dim() != 4 or keys.shape[:3] != values.shape[:3] or (bias is not None and bias.shape != keys.shape[:3]):
            raise ValueError(f"remember needs keys/values [b, h, s, d] and bias [b, h, s]; got {tuple(keys.shape)}, "
                             f"{tuple(values.shape)}, {None if bias is None else tuple(bias.shape)}")
        bias = torch.zeros(keys.shape[:3], device=keys.device) if bias is None else bias.float()
        if self.memory_keys is None:
            self.memory_keys, self.memory_values, self.memory_bias = keys.detach(), values.detach(), bias.detach()
            self.stores = [self._new_store(keys.shape[-1]) for _ in range(keys.shape[0] * keys.shape[1])]
        else:
            if keys.shape[:2] != self.memory_keys.shape[:2] or keys.shape[-1] != self.memory_keys.shape[-1]:
                raise ValueError(f"entries {tuple(keys.shape)} do not match the memory {tuple(self.memory_keys.shape)}")
            self.memory_keys = torch.cat([self.memory_keys, keys.detach()], dim=2)
            self.memory_values = torch.cat([self.memory_values, values.detach()], dim=2)
            self.memory_bias = torch.cat([self.memory_bias, bias.detach()], dim=2)
        self._index(keys, bias, self.stores)

    def _new_store(self, head_dim: int) -> Datastore:
        return Datastore(head_dim + 1, metric="ip", index=self.cache.memory_index, seed=self.cache.seed)

    @staticmethod
    def _index(keys: torch.Tensor, bias: torch.Tensor, stores: list[Datastore]) -> None:
        vectors = torch.cat([keys.float(), bias.clamp_min(SEARCH_BIAS_FLOOR).unsqueeze(-1)], dim=-1)
        for store, rows in zip(stores, vectors.reshape(-1, *vectors.shape[2:])):
            store.add(rows)

    def _map_batch(self, fn) -> None:
        super()._map_batch(fn)
        if self.memory_keys is None:
            return
        self.memory_keys, self.memory_values, self.memory_bias = (fn(t) for t in (self.memory_keys, self.memory_values, self.memory_bias))
        self.stores = [self._new_store(self.memory_keys.shape[-1]) for _ in range(self.memory_keys.shape[0] * self.memory_keys.shape[1])]
        self._index(self.memory_keys, self.memory_bias, self.stores)

    # --- reading it --------------------------------------------------------------------------
    def retrieve(self, scaled_queries: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's top-k memory entries: their attention scores and values.

        Args:
            scaled_queries: [batch, heads, queries, head_dim] float32, multiplied by the softmax scale.
            groups: query heads per KV head.

        Returns:
            ``(scores, values)``: [batch, heads, queries, k] scores ``q . k + bias`` and
            [batch, heads, queries, k, head_dim_v] values, with ``k = min(top_k, memory size)``.
        """
        batch, heads, queries, dim = scaled_queries.shape
        kv_heads = heads // groups
        k = self.memory_size if self.cache.top_k is None else min(self.cache.top_k, self.memory_size)
        # Query heads h * groups + g share KV head h (the repeat_interleave layout of the attention functions).
        grouped = scaled_queries.reshape(batch, kv_heads, groups * queries, dim)
        search = torch.cat([grouped, torch.ones_like(grouped[..., :1])], dim=-1).reshape(batch * kv_heads, groups * queries, dim + 1)
        started = time.perf_counter()
        ids = torch.stack([store.search(rows, k).ids for store, rows in zip(self.stores, search)])
        self.retrieval_seconds += time.perf_counter() - started
        ids = ids.to(scaled_queries.device).reshape(batch, kv_heads, groups * queries * k)
        keys = gather_tokens(self.memory_keys, ids).reshape(batch, kv_heads, groups * queries, k, dim).float()
        values = gather_tokens(self.memory_values, ids)
        values = values.reshape(batch, kv_heads, groups * queries, k, values.shape[-1]).float()
        bias = gather_tokens(self.memory_bias, ids).reshape(batch, kv_heads, groups * queries, k)
        scores = torch.einsum("bhnd,bhnkd->bhnk", grouped, keys) + bias
        return scores.reshape(batch, heads, queries, k), values.reshape(batch, heads, queries, k, values.shape[-1])

    def attend_with_memory(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor, scale: float, dropout: float, validity: torch.Tensor | None):
        """Attention over the local entries (``key``, ``value``, additive ``mask``) and each query's retrieved entries.

        Called by :func:`~metakv_cl.kv.attention.compacted_attention` with the mask it built
        (bias of cached entries, causal/padding block of the new tokens); returns the attention
        output [batch, queries, heads, head_dim_v] and None for the weights.
        """
        batch, heads, queries, _ = query.shape
        groups = heads // key.shape[1]
        scaled = query.float() * scale
        local_scores = scaled @ key.float().repeat_interleave(groups, dim=1).transpose(-1, -2) + mask.float()
        local_values = value.float().repeat_interleave(groups, dim=1)
        memory_scores, memory_values = self.retrieve(scaled, groups)
        if self.cache.combine == "softmax":
            weights = torch.softmax(torch.cat([local_scores, memory_scores], dim=-1), dim=-1)
            local_weights, memory_weights = weights.split([local_scores.shape[-1], memory_scores.shape[-1]], dim=-1)
            local_share = memory_share = 1.0
        else:
            local_weights, memory_weights = torch.softmax(local_scores, dim=-1), torch.softmax(memory_scores, dim=-1)
            local_share = self.cache.gate_per_head(heads, query.device)
            memory_share = 1.0 - local_share
        if self.tracks_attention:
            received = local_weights if validity is None else local_weights * validity[:, None, :, None]
            grouped = received.reshape(batch, key.shape[1], groups * queries, key.shape[-2])
            latest = received[:, :, -1].reshape(batch, key.shape[1], groups, key.shape[-2]).mean(dim=2)
            self.receive_attention(AttentionReceived(total=grouped.sum(dim=2), peak=grouped.amax(dim=2), latest=latest))
        local_weights = torch.nn.functional.dropout(local_weights, p=dropout, training=module.training)
        memory_weights = torch.nn.functional.dropout(memory_weights, p=dropout, training=module.training)
        output = local_share * (local_weights @ local_values) + memory_share * torch.einsum(
            "bhqk,bhqkd->bhqd", memory_weights, memory_values
        )
        return output.to(query.dtype).transpose(1, 2).contiguous(), None


class KNNMemoryCache(CompactedCache):
    """A :class:`~metakv_cl.kv.cache.CompactedCache` with a kNN memory of what it evicts (see the module docstring).

    A drop-in ``past_key_values`` for ``model(...)``, :func:`~metakv_cl.kv.streaming.chunked_prefill`
    and ``generate()`` when built with ``model=`` (or after
    :func:`~metakv_cl.kv.attention.enable_compacted_attention`, with the helpers). Wu et al.,
    "Memorizing Transformers" (ICLR 2022).

    Args:
        method: the compaction method of the local cache, a registered name or an instance.
        max_tokens: capacity of the local cache in full-precision tokens.
        memory_layers: indices of the layers that keep and read a memory (None: every layer;
            the paper uses one layer near the top).
        top_k: entries each query retrieves (None: the whole memory).
        combine: ``"softmax"`` (one softmax over local and retrieved entries) or ``"gate"``.
        gate: the local share g of ``combine="gate"``: a number or a tensor [attention heads] in [0, 1].
        memory_index: ``"flat"`` (exact search) or ``"hnsw"`` (approximate, for long memories).
        seed: seed of the stores.
        **cache_kwargs: the other arguments of :class:`CompactedCache` (``model``, ``config``,
            ``headroom``, ``position_policy``, ... and the method's constructor arguments).

    Raises:
        ValueError: an unbounded method (``full`` evicts nothing), bad ``memory_layers``,
            ``top_k``, ``combine``, ``gate`` or ``memory_index``.
    """

    method: EvictionRecorder
    layer_class = KNNMemoryLayer

    def __init__(self, method: str | KVCompressor, max_tokens: int | None = None, *,
                 memory_layers: Iterable[int] | None = None, top_k: int | None = 32, combine: str = "softmax",
                 gate: float | torch.Tensor = 0.5, memory_index: str = "flat", seed: int = 0, **cache_kwargs: Any):
        method_kwargs = {k: cache_kwargs.pop(k) for k in list(cache_kwargs) if k not in CACHE_ARGUMENTS}
        compressor = get_method(method, **method_kwargs) if isinstance(method, str) else method
        if method_kwargs and not isinstance(method, str):
            raise ValueError("method keyword arguments are only accepted with a method name")
        if not isinstance(compressor, KVCompressor):
            raise ValueError(f"{type(compressor).__name__} is not a KVCompressor (the compaction protocol of metakv_cl.kv)")
        if compressor.unbounded:
            raise ValueError(f"a kNN memory needs a method that evicts; {type(compressor).__name__} keeps every token")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None (the whole memory), got {top_k!r}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine {combine!r}; choose one of {', '.join(COMBINE_MODES)}")
        gate_values = torch.as_tensor(gate, dtype=torch.float32)
        if gate_values.dim() > 1 or bool(((gate_values < 0) | (gate_values > 1)).any()):
            raise ValueError(f"gate must be a number or a [heads] tensor in [0, 1], got {gate!r}")
        if memory_index not in MEMORY_INDEX_KINDS:
            raise ValueError(f"memory_index must be one of {', '.join(MEMORY_INDEX_KINDS)}, got {memory_index!r}")
        if memory_layers is not None:
            memory_layers = frozenset(memory_layers)
            if not memory_layers or any(not isinstance(i, int) or i < 0 for i in memory_layers):
                raise ValueError(f"memory_layers must be non-negative layer indices (None: all), got {sorted(memory_layers, key=str)}")
        super().__init__(EvictionRecorder(compressor), max_tokens, **cache_kwargs)
        self.memory_layers = memory_layers
        self.top_k, self.combine, self.gate = top_k, combine, gate
        self.memory_index, self.seed = memory_index, seed

    def __repr__(self) -> str:
        return (f"KNNMemoryCache({type(self.method.method).__name__}, max_tokens={self.max_tokens}, top_k={self.top_k}, "
                f"combine={self.combine!r}, layers={len(self.layers)})")

    def compact(self, budget: float, *, method: str | KVCompressor | None = None,
                batch_layers: bool | None = None) -> None:
        """One-shot compaction as :meth:`CompactedCache.compact`, layer by layer: each layer keeps what it drops."""
        super().compact(budget, method=method, batch_layers=False)

    def gate_per_head(self, heads: int, device: torch.device) -> torch.Tensor:
        """The local share g as a [1, heads, 1, 1] tensor (a learned gate keeps its gradient).

        Raises:
            ValueError: a gate tensor whose length is not the number of attention heads.
        """
        gate = torch.as_tensor(self.gate, dtype=torch.float32, device=device)
        if gate.dim() == 1 and gate.shape[0] != heads:
            raise ValueError(f"gate has {gate.shape[0]} values, the model has {heads} attention heads")
        return gate.reshape(1, -1, 1, 1).expand(1, heads, 1, 1)

    @property
    def memory_nbytes(self) -> int:
        """Bytes of every layer's memory (entries and store vectors)."""
        return sum(layer.memory_nbytes for layer in self.compacted_layers)

    def stats(self) -> dict[str, float]:
        """:meth:`CompactedCache.stats` plus the memory's entries (per layer, at most), bytes and search time."""
        return {
            **super().stats(),
            "memory_entries": max((layer.memory_size for layer in self.compacted_layers), default=0),
            "memory_bytes": self.memory_nbytes,
            "retrieval_seconds": sum(layer.retrieval_seconds for layer in self.compacted_layers),
        }

