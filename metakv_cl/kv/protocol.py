"""The compaction protocol every KV method implements, and the helpers methods share.

One protocol covers the three families of methods:

* score-and-keep (sliding window, sinks, H2O, random, Attention Matching's key choice): keep a
  subset of the cached tokens;
* merge (moving and cumulative averages, compressive memory): replace blocks of tokens by
  weighted means;
* construct (Attention Matching's fitted values and biases, quantized storage): build new
  entries that reproduce the attention of the old ones.

``compact(keys, values, queries, budget)`` works on one layer at a time, on tensors shaped
[batch, kv_heads, tokens, head_dim], and returns ``(keys, values, bias)``: the compacted keys and
values (float tensors, :class:`~metakv_cl.kv.quantization.QuantizedTensor` or
:class:`~metakv_cl.kv.quantization.KVStorage`) and a per-entry additive attention bias
[batch, kv_heads, entries] (or None). The bias enters attention as ``q.k * scale + bias``; a bias
of ``log w`` makes an entry count like ``w`` copies of itself, which is how merged entries keep
the attention mass of the tokens they replace.

Conventions:

* ``budget`` is the fraction, in (0, 1], of the input's full-precision size to keep. Token
  methods keep ``floor(budget * tokens)`` entries (at least one); quantization methods keep
  ``budget`` of the bytes. ``max_entries`` optionally caps the number of entries too (a model
  with learned positions cannot attend to more entries than its position table). At
  ``budget == 1`` with no cap exceeded every method returns its inputs unchanged.
* ``queries`` are reference queries [batch, kv_heads, n, head_dim], already multiplied by the
  attention's softmax scale (so scores are ``queries @ keys^T + bias``); query heads that share a
  KV head (grouped-query attention) are stacked along n.
* ``bias`` on input is the bias the entries already carry (from an earlier compaction, or
  :data:`MASKED_BIAS` for padding); methods must account for it.
* ``query_groups`` is the number of query heads per KV head: the rows of ``queries`` are
  token-major, ``query_groups`` consecutive rows per token (so the last ``w * query_groups``
  rows are the queries of the last ``w`` tokens when the queries are the most recent ones).
* ``importance`` is the per-entry attention statistic the cache tracks for methods that set
  ``tracks_attention`` (see :meth:`KVCompressor.update_importance`).
* Entries stay in chronological order (merged entries take the place of their block), except
  where a method documents otherwise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Union

import torch

from metakv_cl.kv.quantization import KVStorage, QuantizedTensor

# Bias of entries that must receive no attention (padding). Finite, so that sums stay defined.
MASKED_BIAS = torch.finfo(torch.float32).min

Stored = Union[torch.Tensor, QuantizedTensor, KVStorage]


@dataclass
class CompactedKV:
    """The result of a compaction: unpacks as ``keys, values, bias``.

    Attributes:
        keys: compacted keys [batch, kv_heads, entries, head_dim] (float or quantized).
        values: compacted values, same layout.
        bias: per-entry additive attention bias [batch, kv_heads, entries] (float32), or None.
        kept: for entries that are input tokens, their indices into the input
            [batch, kv_heads, entries] (the cache carries per-token statistics with them);
            None for merged or constructed entries.
    """

    keys: Stored
    values: Stored
    bias: torch.Tensor | None = None
    kept: torch.Tensor | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator:
        return iter((self.keys, self.values, self.bias))


@dataclass
class AttentionReceived:
    """Attention that cached entries received during one forward call, per KV head.

    Attributes:
        total: summed over the call's queries and the query heads of each KV head
            [batch, kv_heads, entries].
        peak: the maximum over the same queries and heads [batch, kv_heads, entries].
        latest: the attention of the call's last query, averaged over the query heads of each
            KV head [batch, kv_heads, entries] (what TOVA ranks by).
    """

    total: torch.Tensor
    peak: torch.Tensor
    latest: torch.Tensor


def attention_from_queries(keys: torch.Tensor, queries: torch.Tensor, bias: torch.Tensor | None,
                           query_groups: int) -> AttentionReceived:
    """The attention that reference queries give the entries, as if they had been tracked during the reads.

    Lets a method that tracks attention compact a cache that was read without tracking (one
    prefill, then any method). The queries attend to every entry, later ones included (the
    captured queries carry no positions); for queries of the last tokens, as in one-shot
    compaction, only the queries inside that window see entries after them.

    Args:
        keys: [batch, kv_heads, entries, head_dim]; queries: [batch, kv_heads, n, head_dim],
            pre-scaled, token-major with ``query_groups`` rows per token; bias: [batch, kv_heads,
            entries] or None.
        query_groups: query heads per KV head.

    Returns:
        :class:`AttentionReceived` of the queries.
    """
    with float32_math(keys.device):
        scores = queries.float() @ keys.float().transpose(-1, -2)
        if bias is not None:
            scores = scores + bias.float().unsqueeze(-2)
        weights = torch.softmax(scores, dim=-1)
    latest = weights[:, :, -query_groups:].mean(dim=2)
    return AttentionReceived(total=weights.sum(dim=2), peak=weights.amax(dim=2), latest=latest)


def float32_math(device: torch.device) -> torch.autocast:
    """A context in which float32 tensors are multiplied in float32, whatever autocast the caller runs under.

    Compaction runs inside the model's forward call, so under ``torch.autocast(dtype=torch.bfloat16)``
    every matrix product of a fit would otherwise be computed in bfloat16 (``.float()`` inputs
    are cast back). Gram matrices and normal equations in bfloat16 are ill-conditioned: the fitted
    values grow by orders of magnitude, each compaction fits the damage of the previous one, and
    perplexity explodes over a long stream.

    Args:
        device: the device the computation runs on (autocast is switched off for its type).
    """
    return torch.autocast(device.type, enabled=False)


def validate_budget(budget: float) -> float:
    """Return ``budget`` as a float, or raise ValueError if it is not in (0, 1]."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"budget must be in (0, 1] (a fraction of the input kept), got {budget}")
    return value


def validate_inputs(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    bias: torch.Tensor | None,
    importance: torch.Tensor | None,
) -> None:
    """Check the shapes of a compaction call; raise ValueError naming the mismatch."""
    if keys.dim() != 4 or values.dim() != 4:
        raise ValueError(
            f"keys and values must be [batch, kv_heads, tokens, head_dim]; got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree on batch, heads or tokens")
    if keys.shape[-2] == 0:
        raise ValueError("cannot compact an empty cache (0 tokens)")
    if queries is not None:
        if queries.dim() != 4 or queries.shape[:2] != keys.shape[:2] or queries.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"queries must be [batch, kv_heads, n, head_dim] = [{keys.shape[0]}, {keys.shape[1]}, n, {keys.shape[-1]}], "
                f"got {tuple(queries.shape)}"
            )
    for name, tensor in (("bias", bias), ("importance", importance)):
        if tensor is not None and tuple(tensor.shape) != tuple(keys.shape[:3]):
            raise ValueError(f"{name} must be [batch, kv_heads, tokens] = {tuple(keys.shape[:3])}, got {tuple(tensor.shape)}")


def entries_for_budget(tokens: int, budget: float, max_entries: int | None = None) -> int:
    """Entries a token method keeps: ``floor(budget * tokens)`` capped by ``max_entries``, at least 1."""
    count = min(tokens, int(math.floor(budget * tokens + 1e-9)))
    if max_entries is not None:
        count = min(count, max_entries)
    return max(1, count)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select entries along the token axis: x [b, h, s] or [b, h, s, d], indices [b, h, t]."""
    if x.dim() == 3:
        return torch.gather(x, 2, indices)
    return torch.gather(x, 2, indices.unsqueeze(-1).expand(*indices.shape, x.shape[-1]))


def token_weights(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """How many tokens each entry stands for, ``exp(bias)`` in float32 (1 where there is no bias)."""
    if bias is None:
        return torch.ones(like.shape[:3], dtype=torch.float32, device=like.device)
    return torch.exp(bias.float())


def weights_to_bias(weights: torch.Tensor) -> torch.Tensor | None:
    """``log(weights)`` as a bias (MASKED_BIAS for zero weight), or None if every weight is 1."""
    if torch.all(weights == 1):
        return None
    return torch.where(weights > 0, torch.log(weights.clamp_min(1e-38)), torch.full_like(weights, MASKED_BIAS))


def merge_entries(
    keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted means of entries grouped into ``slots`` slots (the same grouping for every head).

    Args:
        keys, values: [b, h, s, d] entries.
        weights: [b, h, s] token weights (how many tokens each entry stands for; 0 = padding).
        assignment: [s] slot index in [0, slots) of every entry.
        slots: number of output slots.

    Returns:
        (keys, values, weights) of the slots, [b, h, slots, d] and [b, h, slots]. A slot whose
        entries all have zero weight gets the plain mean and weight 0.
    """
    one_hot = torch.nn.functional.one_hot(assignment.to(keys.device), slots).to(torch.float32)  # [s, slots]
    slot_weights = torch.einsum("bhs,sk->bhk", weights, one_hot)
    mixing = weights.unsqueeze(-1) * one_hot  # [b, h, s, slots]
    # Fall back to a plain mean for slots made of padding only, so no division by zero.
    empty = slot_weights <= 0
    mixing = torch.where(empty.unsqueeze(2), one_hot.expand_as(mixing), mixing)
    mixing = mixing / mixing.sum(dim=2, keepdim=True).clamp_min(1e-30)
    merged_keys = torch.einsum("bhsk,bhsd->bhkd", mixing, keys.float()).to(keys.dtype)
    merged_values = torch.einsum("bhsk,bhsd->bhkd", mixing, values.float()).to(values.dtype)
    return merged_keys, merged_values, slot_weights


class KVCompressor(ABC):
    """The compaction protocol (see the module docstring), with its input checks and ``budget == 1`` identity.

    A method subclasses it and implements :meth:`_compact`; callers use :meth:`compact`.

    Class attributes:
        tracks_attention: the cache records the attention each entry receives and keeps it in
            ``importance`` (see :meth:`update_importance`).
        needs_queries: the cache captures reference queries for :meth:`compact`.
        unbounded: the method never drops anything (the full cache); the cache ignores its
            capacity.
        query_sampling: which reference queries the cache keeps when it captures more than it
            may hold: ``"recent"`` (the latest ones) or ``"spread"`` (evenly spaced over
            everything read so far).
        reference: where one-shot compaction takes the reference queries from: ``"context"``
            (the context's reading) or ``"repeat"`` (a second reading of the context after
            itself, :func:`metakv_cl.kv.streaming.repeat_prefill`).
        rows_independent: the method compacts every (batch row, KV head) on its own, with no
            state carried between calls, so the cache may stack layers along the batch axis
            and compact a whole model in one call (same result as layer by layer).
    """

    tracks_attention: ClassVar[bool] = False
    needs_queries: ClassVar[bool] = False
    unbounded: ClassVar[bool] = False
    query_sampling: ClassVar[str] = "recent"
    reference: ClassVar[str] = "context"
    rows_independent: ClassVar[bool] = False

    def compact(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None,
        budget: float,
        *,
        bias: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
        max_entries: int | None = None,
        query_groups: int = 1,
    ) -> CompactedKV:
        """Compact one layer's cache to ``budget`` of its full-precision size.

        Args:
            keys: [batch, kv_heads, tokens, head_dim].
            values: [batch, kv_heads, tokens, head_dim_v].
            queries: reference queries [batch, kv_heads, n, head_dim], pre-scaled, or None.
            budget: fraction in (0, 1] of the input's full-precision size to keep.
            bias: the entries' current additive attention bias [batch, kv_heads, tokens].
            importance: the cache's per-entry attention statistic [batch, kv_heads, tokens].
            max_entries: a cap on the number of entries, beside the byte budget (models with
                learned positions cannot hold more entries than their position table).
            query_groups: query heads per KV head (rows of ``queries`` per token).

        Returns:
            :class:`CompactedKV` (unpacks as ``keys, values, bias``).

        Raises:
            ValueError: a budget outside (0, 1], a cap below 1, query groups that do not divide
                the queries, or inconsistent shapes.
        """
        budget = validate_budget(budget)
        validate_inputs(keys, values, queries, bias, importance)
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if query_groups < 1 or (queries is not None and queries.shape[-2] % query_groups):
            rows = None if queries is None else queries.shape[-2]
            raise ValueError(f"query_groups must be >= 1 and divide the {rows} query rows, got {query_groups}")
        tokens = keys.shape[-2]
        if budget >= 1.0 and (max_entries is None or tokens <= max_entries):
            kept = torch.arange(tokens, device=keys.device).expand(*keys.shape[:2], tokens)
            return CompactedKV(keys, values, bias, kept)
        return self._compact(keys, values, queries, budget, bias=bias, importance=importance, max_entries=max_entries,
                             query_groups=query_groups)

    @abstractmethod
    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        """Compact validated inputs (``budget < 1``, or more entries than ``max_entries``); arguments as :meth:`compact`."""

    def initial_importance(self, like: torch.Tensor) -> torch.Tensor:
        """Importance of entries that just entered the cache ([b, h, s] zeros by default)."""
        return torch.zeros(like.shape[:3], dtype=torch.float32, device=like.device)

    def update_importance(self, importance: torch.Tensor, received: AttentionReceived) -> torch.Tensor:
        """Fold one forward call's attention into the importance (accumulated attention by default)."""
        return importance + received.total

    def layer_share(self, layer: int, layers: int, budget: float) -> float:
        """Layer ``layer``'s share of the mean per-layer budget among ``layers`` layers (1: every layer alike).

        A method with layer-wise budgets returns shares whose mean over the layers is 1 and
        with ``budget * share <= 1`` (so at ``budget == 1`` every share is 1 and nothing
        changes). The cache multiplies the budget of a one-shot compaction, and the capacity of
        each layer of a cache that compacts as it reads, by it.

        Args:
            layer: the layer's index; layers: the model's layer count.
            budget: the mean fraction kept: of the context (one-shot compaction), or of the
                tokens read so far (a cache that compacts as it reads).
        """
        return 1.0


class TokenSelector(KVCompressor):
    """Score-and-keep methods: choose ``count`` input tokens per (batch, head); the rest are dropped."""

    rows_independent: ClassVar[bool] = True

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        count = entries_for_budget(keys.shape[-2], budget, max_entries)
        kept = self.select(keys, values, queries, count, bias=bias, importance=importance, query_groups=query_groups)
        kept, _ = kept.sort(dim=-1)  # chronological order
        return CompactedKV(
            gather_tokens(keys, kept),
            gather_tokens(values, kept),
            None if bias is None else gather_tokens(bias, kept),
            kept,
        )

    @abstractmethod
    def select(self, keys, values, queries, count: int, *, bias, importance, query_groups) -> torch.Tensor:
        """Indices [batch, kv_heads, count] of the tokens to keep (any order); other arguments as :meth:`compact`."""


def recent_indices(tokens: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """The last ``count`` token indices, expanded to [batch, heads, count]."""
    return torch.arange(tokens - count, tokens, device=like.device).expand(*like.shape[:2], count)
