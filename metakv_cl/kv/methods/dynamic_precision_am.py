"""Dynamic precision for the tokens kept, Attention Matching for the tokens evicted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from metakv_cl.kv.methods.attention_matching import AttentionMatching, attention_outputs, key_scores
from metakv_cl.kv.methods.dynamic_precision import AttentionGuidedPrecision
from metakv_cl.kv.protocol import CompactedKV, float32_math, gather_tokens
from metakv_cl.kv.quantization import KVStorage
from metakv_cl.kv.registry import register_method

BIAS_BYTES = 4  # one float32 bias per entry and head
RELEVANCES = ("reference_rms", "tracked")


@register_method("dynamic_precision_am")
@dataclass
class PrecisionWithMatchedEvictions(AttentionGuidedPrecision):
    """Mixed precision for the relevant tokens; fitted entries that attend like the evicted rest.

    The combination of two methods of this package (issue 20, item 7):

    * the kept tokens are stored as ``dynamic_precision`` stores them (the attention-guided mixed
      precision of Yang et al., "No Token Left Behind: Reliable KV Cache Compression via
      Importance-Aware Mixed Precision Quantization" (MiKV, 2024) and Dong et al., "QAQ: Quality
      Adaptive Quantization for LLM KV Cache" (2024)): relevance-ranked, each precision chosen by
      its measured attention distortion per byte, the rest evicted;
    * the evicted tokens, instead of vanishing, are summarised by Attention Matching (Zweiger,
      Fu, Guo, Kim, "Fast KV Compaction via Attention Matching", 2026): a few of their keys,
      each with a fitted bias beta (the block's attention mass) and fitted values (the block's
      attention output), fitted on the reference queries (AM's ``_fit_block``).

    Design choices:

    * Relevance (which tokens are kept, and which get more bits) is AM's key score by default
      (``relevance="reference_rms"``): the root mean square of the attention the reference
      queries give a token. ``dynamic_precision``'s own signal (``"tracked"``: H2O's attention,
      Zhang et al., NeurIPS 2023, as an EMA of its peak per forward call) mostly encodes, after a
      one-shot prefill, which prefill chunk a token was read in (new tokens start at 1 and a
      2,048-token context is read in four calls), not how much the token is attended.
    * The fit covers the evicted block alone, the kept tokens are not refitted. Attention over a
      partition of the entries is the mass-weighted mix of each part's attention, so a summary
      that reproduces the evicted block's log-mass and output for a query makes the whole
      layer attend as kept + evicted would. Refitting kept tokens is what made ``h2o_refit``
      worse than H2O (``benchmarks/results/kv_eval_oneshot_refit_smollm2_cpu``); here the kept
      tokens keep their own (quantized) keys and values.
    * Summary entries are stored in full precision: their values are solutions of a least-squares
      fit, not tokens, and their bias must be exact. Once one entry carries a bias every entry
      of the layer does, so each kept token's cost includes its bias bytes too: the returned
      keys, values and bias together stay within the budget (Attention Matching alone does not
      count its bias).
    * The byte split between the two parts is measured per layer, not fixed: each share of
      ``summary_shares`` (0 is the precision plan alone) is planned, fitted on the queries of
      every other reference token and scored by the attention-output error
      ``mean |o' - o| / mean |o|`` of the layer on the other half, held out; the best share is
      refitted on all the queries. Held-out scoring matters: an in-sample error rewards the
      value fit for overfitting the reference queries. Ties go to the smaller summary.
      ``summary_shares=(0.0,)`` is the ablation without the summary (how the two compare:
      ``benchmarks/results/kv_eval_oneshot_dp_am_smollm2_cpu``).
    * Reference queries are spread over the whole context (AM's default, ``query_sampling =
      "spread"``): the summary stands for tokens from anywhere in it. The distortion measure of
      the precision plan uses the same queries.
    * Without reference queries there is nothing to fit or score: the method is
      ``dynamic_precision`` with the importance it is given (tracked, else recency).

    Entries: the kept tokens as ``dynamic_precision`` orders them (full precision first, then
    ``bits`` high to low), then the summary entries (chronological by the key they reuse).

    Args:
        bits, decay, group_size: as ``dynamic_precision`` (``decay`` only with tracked relevance).
        summary_shares: candidate fractions of the layer's bytes spent on the summary, each in [0, 1).
        relevance: ``"reference_rms"`` (AM's key score) or ``"tracked"`` (``dynamic_precision``'s EMA).
        score, nnls_iterations, ridge, fit_values: the summary's AM options (key score, NNLS
            steps, value ridge, whether values are fitted).
    """

    summary_shares: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    relevance: str = "reference_rms"
    score: str = "rms"
    nnls_iterations: int = 10
    ridge: float = 1e-3
    fit_values: bool = True
    query_sampling: ClassVar[str] = "spread"

    @property
    def tracks_attention(self) -> bool:
        """Attention is tracked (the prefill computes its weights explicitly) only for tracked relevance."""
        return self.relevance == "tracked"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.summary_shares = tuple(sorted({float(share) for share in self.summary_shares}))
        if not self.summary_shares or any(not 0.0 <= share < 1.0 for share in self.summary_shares):
            raise ValueError(f"summary_shares must be fractions in [0, 1), got {self.summary_shares}")
        if self.relevance not in RELEVANCES:
            raise ValueError(f"unknown relevance {self.relevance!r}; choose one of {', '.join(RELEVANCES)}")
        self._matching = AttentionMatching(score=self.score, nnls_iterations=self.nnls_iterations, ridge=self.ridge,
                                           fit_values=self.fit_values, sinks=0, recent_fraction=0.0)

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        if queries is None or queries.shape[-2] == 0:
            return super()._compact(keys, values, queries, budget, bias=bias, importance=importance,
                                    max_entries=max_entries, query_groups=query_groups)
        tokens = keys.shape[-2]
        costs = self._level_costs(keys.shape[-1], values.shape[-1], keys.element_size())
        if self.relevance == "reference_rms":
            importance = reference_rms(keys, queries, bias)
        rank_relevance, ranked = self.ranking(keys, bias, importance)
        distortions = self.distortions(keys, values, queries).mean(dim=(0, 1, 2)).cpu().expand(tokens, -1)
        prior = torch.zeros(keys.shape[:3], device=keys.device) if bias is None else bias.float()

        def candidate(share: float, fit_queries: torch.Tensor) -> CompactedKV:
            return self.split(keys, values, bias, prior, fit_queries, share, budget * tokens * costs[-1], costs,
                              rank_relevance, ranked, distortions, max_entries)

        if len(self.summary_shares) == 1:  # nothing to choose
            return candidate(self.summary_shares[0], queries)
        fit_queries, check_queries = held_out_queries(queries, query_groups)
        _, exact = attention_outputs(check_queries, keys, values, bias)
        best_share, best_error = None, float("inf")
        for share in self.summary_shares:
            error = output_error(candidate(share, fit_queries), check_queries, exact)
            if error < best_error:
                best_share, best_error = share, error
        return candidate(0.0 if best_share is None else best_share, queries)

    def split(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, prior: torch.Tensor,
              queries: torch.Tensor, share: float, allowed: float, costs: list[float], rank_relevance: torch.Tensor,
              ranked: torch.Tensor, distortions: torch.Tensor, max_entries: int | None) -> CompactedKV:
        """The layer with ``share`` of ``allowed`` bytes per head on a summary fitted on ``queries``, the rest on precision.

        Args:
            keys, values: [batch, heads, tokens, d]; bias: the entries' bias or None; prior: the
                bias as a tensor (zeros for None).
            queries: pre-scaled queries the summary is fitted on [batch, heads, n, d].
            share: fraction of the bytes for the summary; allowed: bytes per head.
            costs: bytes per token of each level (:meth:`_level_costs`, without bias).
            rank_relevance, ranked: :meth:`ranking`; distortions: [tokens, levels] per rank.
            max_entries: cap on all entries (kept and summary), split by ``share`` too.
        """
        batch, heads, _, dim = keys.shape
        summary_cost = costs[-1] + BIAS_BYTES
        count = int(share * allowed // summary_cost)
        if max_entries is not None:
            count = min(count, int(share * max_entries))
        if count > 0 or bias is not None:  # every entry then carries a bias
            costs = [costs[0]] + [cost + BIAS_BYTES for cost in costs[1:]]
        levels = self.plan(rank_relevance, allowed - count * summary_cost, costs, distortions,
                           None if max_entries is None else max_entries - count)
        evicted_ranks = (levels == 0).nonzero().squeeze(-1).to(ranked.device)
        count = min(count, evicted_ranks.numel())
        kept = self.store(keys, values, prior if count > 0 else bias, levels, ranked)
        if count == 0:
            return kept
        evicted = ranked[..., evicted_ranks].sort(dim=-1).values  # [batch, heads, evicted]
        flat = batch * heads

        def block(x: torch.Tensor) -> torch.Tensor:
            return gather_tokens(x, evicted).reshape(flat, evicted.shape[-1], *x.shape[3:]).float()

        with float32_math(keys.device):
            chosen, summary_keys, summary_values, summary_bias = self._matching._fit_block(
                block(keys), block(values), block(prior), queries.reshape(flat, -1, dim).float(), count, batch, count)
        positions = torch.gather(evicted.reshape(flat, -1), 1, chosen).reshape(batch, heads, count)
        return CompactedKV(
            KVStorage([*kept.keys.segments, summary_keys.to(keys.dtype).reshape(batch, heads, count, -1)]),
            KVStorage([*kept.values.segments, summary_values.to(values.dtype).reshape(batch, heads, count, -1)]),
            torch.cat([kept.bias, summary_bias.reshape(batch, heads, count)], dim=-1),
            torch.cat([kept.kept, positions], dim=-1),
        )


def reference_rms(keys: torch.Tensor, queries: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Root mean square over the reference queries of the attention each entry gets [batch, heads, tokens] (AM's key score)."""
    with float32_math(keys.device):
        scores = queries.float() @ keys.float().transpose(-1, -2)
        if bias is not None:
            scores = scores + bias.float().unsqueeze(-2)
        return key_scores(torch.softmax(scores, dim=-1), "rms")


def held_out_queries(queries: torch.Tensor, query_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, check): the queries of even and of odd reference tokens (all of them for both with one token).

    Args:
        queries: [batch, heads, n, d], token-major with ``query_groups`` rows per token.
    """
    batch, heads, rows, dim = queries.shape
    if rows // query_groups < 2:
        return queries, queries
    per_token = queries.reshape(batch, heads, rows // query_groups, query_groups, dim)
    return per_token[:, :, 0::2].reshape(batch, heads, -1, dim), per_token[:, :, 1::2].reshape(batch, heads, -1, dim)


def output_error(result: CompactedKV, queries: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative attention-output error ``mean |o' - o| / mean |o|`` of ``result`` for ``queries`` (exact outputs ``exact``)."""
    _, output = attention_outputs(queries, KVStorage.wrap(result.keys).to_float(),
                                  KVStorage.wrap(result.values).to_float(), result.bias)
    return float((output - exact).norm(dim=-1).mean() / exact.norm(dim=-1).mean().clamp_min(1e-30))
