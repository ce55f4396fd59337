"""Attention Matching: compact keys, a per-key bias and fitted values that reproduce attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from metakv_cl.kv.protocol import MASKED_BIAS, CompactedKV, KVCompressor, entries_for_budget, float32_math
from metakv_cl.kv.registry import register_method

SELECTIONS = ("highest_attention", "omp", "accumulated_attention")
SCORES = ("max", "mean", "rms")
HEAD_BUDGETS = ("uniform", "adaptive")
QUERY_SAMPLINGS = ("spread", "recent")
REFERENCES = ("context", "repeat")


def key_scores(attention: torch.Tensor, score: str) -> torch.Tensor:
    """Each key's score from the attention the reference queries give it, [..., queries, keys] -> [..., keys].

    Args:
        attention: attention weights, queries on the second-to-last axis.
        score: ``"max"``, ``"mean"`` or ``"rms"`` over the queries (:data:`SCORES`).
    """
    if score == "max":
        return attention.amax(dim=-2)
    if score == "mean":
        return attention.mean(dim=-2)
    return torch.linalg.vector_norm(attention, dim=-2) / math.sqrt(attention.shape[-2])  # no squared copy


def attention_outputs(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log attention mass and attention output of pre-scaled queries over a block of keys.

    Args:
        queries: [..., n, d] (already multiplied by the softmax scale).
        keys: [..., s, d]; values: [..., s, dv]; bias: [..., s] or None.

    Returns:
        (log_mass [..., n], output [..., n, dv]): ``logsumexp_j(q.k_j + bias_j)`` and
        ``softmax(q.K^T + bias) V``, in float32.
    """
    with float32_math(queries.device):
        scores = queries.float() @ keys.float().transpose(-1, -2)
        if bias is not None:
            scores = scores + bias.float().unsqueeze(-2)
        return torch.logsumexp(scores, dim=-1), torch.softmax(scores, dim=-1) @ values.float()


def _largest_eigenvalue(gram: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Power-iteration estimate of the largest eigenvalue of symmetric PSD matrices [batch, t, t], padded by 10%."""
    vector = torch.ones(gram.shape[:-1], device=gram.device, dtype=gram.dtype)
    for _ in range(steps):
        vector = (gram @ vector.unsqueeze(-1)).squeeze(-1)
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    rayleigh = (vector * (gram @ vector.unsqueeze(-1)).squeeze(-1)).sum(dim=-1)
    return 1.1 * rayleigh.clamp_min(1e-30)


def solve_positive_definite(system: torch.Tensor, right: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``system^-1 @ right`` for batched symmetric positive definite systems, by Cholesky, with no host sync.

    Args:
        system: [batch, t, t]; right: [batch, t, k]; fallback: [batch, t, k], the answer of rows
            whose factorisation fails (not numerically positive definite).

    Returns:
        [batch, t, k].
    """
    factor, info = torch.linalg.cholesky_ex(system)  # unlike linalg.solve, no error check that waits for the device
    return torch.where((info != 0).view(-1, 1, 1), fallback, torch.cholesky_solve(right, factor))


def nonnegative_least_squares(design: torch.Tensor, target: torch.Tensor, iterations: int, floor: float = 1e-12) -> torch.Tensor:
    """Batched ``argmin_{w >= floor} ||design @ w - target||`` (see :func:`nonnegative_least_squares_normal`).

    Args:
        design: [batch, n, t]; target: [batch, n]; iterations: projected-gradient steps.

    Returns:
        w [batch, t].
    """
    gram = design.transpose(-1, -2) @ design
    moment = (design.transpose(-1, -2) @ target.unsqueeze(-1)).squeeze(-1)
    return nonnegative_least_squares_normal(gram, moment, iterations, floor)


def nonnegative_least_squares_normal(gram: torch.Tensor, moment: torch.Tensor, iterations: int,
                                     floor: float = 1e-12) -> torch.Tensor:
    """Batched non-negative least squares from the normal equations ``gram = D^T D``, ``moment = D^T y``.

    Starts from the best (per batch row) of three feasible points: all ones (the keys as they
    are), the best uniform rescaling ``c * 1``, and the clamped least-squares solution
    regularised towards ``c * 1`` (stable when the design is ill-conditioned, as exp-scores of
    near-uniform attention are); then runs projected gradient descent with step ``1 / L``, which
    never increases the objective. So the result fits at least as well as keeping the keys
    without bias.

    Args:
        gram: [batch, t, t]; moment: [batch, t]; iterations: projected-gradient steps.

    Returns:
        w [batch, t].
    """

    def objective(weights: torch.Tensor) -> torch.Tensor:  # ||D w - y||^2 - ||y||^2
        return (weights * ((gram @ weights.unsqueeze(-1)).squeeze(-1) - 2 * moment)).sum(dim=-1)

    ones = torch.ones_like(moment)
    scale = (moment.sum(dim=-1) / gram.sum(dim=(-1, -2)).clamp_min(1e-30)).clamp_min(floor)
    uniform = scale.unsqueeze(-1) * ones
    strength = 1e-4 * gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-30)
    regularised = gram + strength[:, None, None] * torch.eye(gram.shape[-1], device=gram.device)
    right = (moment + strength.unsqueeze(-1) * uniform).unsqueeze(-1)
    solved = solve_positive_definite(regularised, right, uniform.unsqueeze(-1)).squeeze(-1).clamp_min(floor)
    candidates = torch.stack([ones, uniform, solved])  # [3, batch, t]
    best = torch.stack([objective(c) for c in candidates]).argmin(dim=0)
    weights = torch.gather(candidates, 0, best.view(1, -1, 1).expand(1, -1, candidates.shape[-1])).squeeze(0)
    if iterations > 0:
        start = weights
        lipschitz = _largest_eigenvalue(gram).unsqueeze(-1)
        for _ in range(iterations):
            gradient = (gram @ weights.unsqueeze(-1)).squeeze(-1) - moment
            weights = (weights - gradient / lipschitz).clamp_min(floor)
        # The step uses an estimate of L; keep the start wherever it was better after all.
        weights = torch.where((objective(weights) <= objective(start)).unsqueeze(-1), weights, start)
    return weights


@register_method("attention_matching")
@register_method("h2o_refit", selection="accumulated_attention", sinks=0, recent_fraction=0.5)
@dataclass
class AttentionMatching(KVCompressor):
    """Attention Matching (AM): per layer and KV head, a smaller block that attends like the original.

    Zweiger, Fu, Guo, Kim, "Fast KV Compaction via Attention Matching" (2026). For reference
    queries q (the context's own queries, captured by the cache), with scores
    ``s_j = q.k_j + b_j`` over the block being compacted:

    1. compact keys are a subset of the block's keys, chosen by highest attention (the max,
       mean or RMS over queries of each key's attention weight), by orthogonal matching
       pursuit on the attention-mass targets ``Z(q) = sum_j exp(s_j)``, or by H2O's
       accumulated attention (the refit mode, below);
    2. a per-key bias ``beta = log w`` makes the compact block carry the original mass:
       ``w = argmin_{w >= 0} sum_q (sum_i w_i exp(s_i) / Z(q) - 1)^2`` (non-negative least
       squares on the relative error, so that every query counts alike, also those whose
       attention mostly goes elsewhere);
    3. compact values solve ``min_C ||softmax(q.K_c^T + beta) C - softmax(s) V||^2`` (least
       squares over the queries, ridge-regularised towards the selected original values).

    A block that keeps its mass and its output keeps its share of any softmax it is part of,
    so blocks can be compacted separately. The first ``sinks`` entries (attention sinks) and
    the most recent ``recent_fraction`` of the kept entries stay exact, and only the block
    between them is fitted. In a cache that compacts every few tokens, the tokens just read
    then stay exact until they leave the recent window (the queries that will attend to them
    most are still to come), and the sinks (StreamingLLM) survive every compaction; fitting
    the whole cache instead lost to H2O at budgets <= 10 % of a long context. With the bias
    the fitted block keeps its share of attention when new tokens arrive after it, and
    successive compactions account for biases fitted earlier. The fit computes in float32 even
    when the model runs under autocast (see :func:`float32_math`): in bfloat16 its errors
    compound over repeated compactions.

    Refit mode, registered as ``h2o_refit``: the keys H2O keeps (Zhang et al., "H2O:
    Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", NeurIPS
    2023; the attention each entry accumulated while the context was read, with half of the
    kept entries the most recent tokens and no sinks), with the bias and values fitted on top.
    With ``fit_bias=False, fit_values=False`` it is H2O itself, so the fit's effect on H2O's
    own choice of keys is measured alone.
    Measured (issue 20, ``benchmarks/results/kv_eval_oneshot_refit_smollm2_cpu/``): on
    SmolLM2-135M one-shot the fit makes H2O's keys worse at every budget from 50 to 2 %; the
    value solve, fitted on the context's queries, raises the attention-output error on the
    continuation's queries. A tool to study the fit, not a method to use.

    Args:
        selection: ``"highest_attention"``, ``"omp"`` or ``"accumulated_attention"`` (H2O's
            statistic, tracked by the cache; without it, the attention the reference queries
            give the block, summed).
        score: aggregate of attention over queries for highest-attention selection. ``"rms"``
            by default: on SmolLM2-135M one-shot (issue 20) it beat ``"max"`` at 10, 5 and 2 %
            (perplexity 20.03 / 22.39 / 25.18 against 21.05 / 22.68 / 25.60).
        query_sampling: which reference queries the cache keeps when the context has more than
            it may hold: ``"spread"`` (evenly spaced over the whole context, the default: with
            the latest 1,024 query vectors the fit saw only the last 341 tokens of a 2,048-token
            SmolLM2 context, and spreading them lowered one-shot perplexity at 10 % from 21.05
            to 19.77, issue 20) or ``"recent"``.
        reference: where the reference queries come from in one-shot compaction. ``"context"``
            (the default): the context's own queries, captured as it is read. ``"repeat"``: the
            paper's repeat-prefill, the context read a second time after itself (a probe whose
            tokens are dropped, :func:`metakv_cl.kv.streaming.repeat_prefill`) and only the second
            reading's queries kept. The fit scores every reference query against every key of
            the block, with no causal mask; a context query at position i then scores keys after
            i, at negative relative (RoPE) distances no real query ever sees, while every key is
            in the past of the repeated queries, as of the continuation's. The one-shot paths
            (:func:`metakv_cl.kv.oneshot.compaction`, ``kv-eval --protocol oneshot``) run the
            second reading (twice the prefill time); a streaming cache ignores the option (see
            ``repeat_queries`` of :func:`metakv_cl.kv.streaming.stream_log_likelihood`). Not the
            default: how it compares is in ``benchmarks/results/kv_eval_oneshot_am_study_smollm2_cpu/``.
        head_budgets: ``"uniform"`` (the same number of keys per head) or ``"adaptive"``: heads
            get keys in proportion to how many keys cover ``coverage`` of their mean
            attention, with the layer total unchanged. Heads with fewer keys are padded with
            masked entries (bias ``MASKED_BIAS``), which the reported bytes include.
        coverage: attention coverage defining a head's need, for adaptive budgets.
        nnls_iterations: projected-gradient steps of the NNLS fit (0: clamped least squares).
        ridge: ridge strength of the value fit, relative to the mean diagonal of the Gram matrix.
        omp_keys_per_step: keys added per OMP step (default: about 32 steps in total; 1 is
            the most accurate and the slowest).
        fit_bias: fit beta (else 0); fit_values: fit the values (else keep the originals). Both
            on is the method; the switches give its ablations.
        sinks: first entries kept exact (at most half of the kept entries).
        recent_fraction: share of the kept entries reserved for the most recent entries, kept
            exact (at least one kept entry is always fitted). ``sinks=0, recent_fraction=0``
            fits the whole cache.
    """

    selection: str = "highest_attention"
    score: str = "rms"
    query_sampling: str = "spread"
    reference: str = "context"
    head_budgets: str = "uniform"
    coverage: float = 0.95
    nnls_iterations: int = 10
    ridge: float = 1e-3
    omp_keys_per_step: int | None = None
    fit_bias: bool = True
    fit_values: bool = True
    sinks: int = 4
    recent_fraction: float = 0.1
    needs_queries: ClassVar[bool] = True

    @property
    def tracks_attention(self) -> bool:
        """The cache tracks accumulated attention only for the selection that ranks by it."""
        return self.selection == "accumulated_attention"

    def __post_init__(self) -> None:
        for name, value, allowed in (("selection", self.selection, SELECTIONS), ("score", self.score, SCORES),
                                     ("head_budgets", self.head_budgets, HEAD_BUDGETS),
                                     ("query_sampling", self.query_sampling, QUERY_SAMPLINGS),
                                     ("reference", self.reference, REFERENCES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not 0.0 < self.coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.nnls_iterations < 0 or self.ridge < 0:
            raise ValueError("nnls_iterations and ridge must be >= 0")
        if self.omp_keys_per_step is not None and self.omp_keys_per_step < 1:
            raise ValueError(f"omp_keys_per_step must be >= 1, got {self.omp_keys_per_step}")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")
        if not 0.0 <= self.recent_fraction < 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1), got {self.recent_fraction}")

    @property
    def rows_independent(self) -> bool:
        """Uniform budgets fit every (batch, head) row alone; adaptive ones pad all rows to the largest share."""
        return self.head_budgets == "uniform"

    def exact_counts(self, count: int) -> tuple[int, int]:
        """(sinks, recent): how many of ``count`` kept entries are the first and the last entries, unchanged."""
        sinks = min(self.sinks, count // 2)
        recent = min(round(self.recent_fraction * count), count - sinks - 1)
        return sinks, recent

    def _compact(self, keys, values, queries, budget, *, bias, importance, max_entries, query_groups) -> CompactedKV:
        if queries is None or queries.shape[-2] == 0:
            raise ValueError(
                "Attention Matching needs reference queries: run the model with a CompactedCache after "
                "enable_compacted_attention(model), or pass queries [batch, kv_heads, n, head_dim]"
            )
        batch, heads, tokens, _ = keys.shape
        flat = batch * heads
        count = entries_for_budget(tokens, budget, max_entries)
        sinks, recent = self.exact_counts(count)
        key_block = keys.reshape(flat, tokens, -1).float()
        value_block = values.reshape(flat, tokens, -1).float()
        prior = torch.zeros(flat, tokens, device=keys.device) if bias is None else bias.reshape(flat, tokens).float()
        middle = slice(sinks, tokens - recent)
        per_head_cap = min(tokens, max_entries or tokens) - sinks - recent
        accumulated = None if importance is None else importance.reshape(flat, tokens)[:, middle].float()
        with float32_math(keys.device):
            kept, fitted_keys, fitted_values, fitted_bias = self._fit_block(
                key_block[:, middle], value_block[:, middle], prior[:, middle],
                queries.reshape(flat, -1, keys.shape[-1]).float(), count - sinks - recent, batch, per_head_cap,
                accumulated,
            )

        def around(first: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor:
            """The fitted block between the exact sinks and recent entries of ``first`` (token axis 1)."""
            return torch.cat([first[:, :sinks], fitted, first[:, tokens - recent :]], dim=1)

        positions = torch.arange(tokens, device=keys.device).expand(flat, tokens)
        slots = sinks + kept.shape[1] + recent
        return CompactedKV(
            around(key_block, fitted_keys).to(keys.dtype).reshape(batch, heads, slots, -1),
            around(value_block, fitted_values).to(values.dtype).reshape(batch, heads, slots, -1),
            around(prior, fitted_bias).reshape(batch, heads, slots),
            around(positions, kept + sinks).reshape(batch, heads, slots),
        )

    def _fit_block(self, key_block: torch.Tensor, value_block: torch.Tensor, prior: torch.Tensor, queries: torch.Tensor,
                   count: int, batch: int, max_count: int,
                   accumulated: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Attention Matching of one block per (batch, head) row: keys, bias and values for the queries.

        Args:
            key_block, value_block: [flat, tokens, d] float32; prior: the entries' bias [flat, tokens].
            queries: pre-scaled reference queries [flat, n, d].
            count: keys per row (the adaptive split keeps the layer total); batch: rows of heads.
            max_count: the most keys one row may get.
            accumulated: the block's tracked attention [flat, tokens] for ``"accumulated_attention"``, or None.

        Returns:
            (kept indices into the block [flat, slots], keys [flat, slots, d], values [flat, slots, dv],
            bias [flat, slots]); entries beyond a row's share are masked (bias ``MASKED_BIAS``, zeros).
        """
        valid = prior > MASKED_BIAS / 2
        # exp(s_ij) / Z(q_i): the block's attention, and the design of the mass fit (target: all ones).
        attention = torch.softmax(torch.baddbmm(prior.unsqueeze(1), queries, key_block.transpose(1, 2)), dim=-1)  # [flat, n, tokens]

        counts = self._head_counts(attention, valid, count, batch, max_count)
        # Uniform budgets need no look at the counts; the adaptive split's largest share must reach the host.
        slots = count if self.head_budgets == "uniform" else int(counts.max())
        if self.selection == "omp":
            chosen = self._omp(attention, valid, slots)
        elif self.selection == "accumulated_attention":
            scores = attention.sum(dim=1) if accumulated is None else accumulated
            chosen = scores.masked_fill(~valid, float("-inf")).topk(slots, dim=-1).indices
        else:
            chosen = self._highest_attention(attention, valid, slots)
        in_budget = torch.arange(slots, device=key_block.device) < counts.unsqueeze(-1)  # by selection rank
        kept, order = chosen.sort(dim=-1)
        in_budget = torch.gather(in_budget, 1, order)

        design = torch.gather(attention, 2, kept.unsqueeze(1).expand(-1, attention.shape[1], -1)) * in_budget.unsqueeze(1)
        if self.fit_bias:
            weights = nonnegative_least_squares(design, design.new_ones(design.shape[:2]), self.nnls_iterations)
        else:
            weights = torch.ones_like(kept, dtype=torch.float32)
        bias = torch.log(weights) + torch.gather(prior, 1, kept)
        selected_values = torch.gather(value_block, 1, kept.unsqueeze(-1).expand(-1, -1, value_block.shape[-1]))
        if self.fit_values:
            selected_values = self._fit_values(design * weights.unsqueeze(1), attention @ value_block, selected_values)
        selected_keys = torch.gather(key_block, 1, kept.unsqueeze(-1).expand(-1, -1, key_block.shape[-1]))
        mask = in_budget.unsqueeze(-1)
        return kept, selected_keys * mask, selected_values * mask, bias.masked_fill(~in_budget, MASKED_BIAS)

    def _head_counts(self, attention: torch.Tensor, valid: torch.Tensor, count: int, batch: int,
                     max_count: int) -> torch.Tensor:
        """Keys per (batch, head) [flat]: ``count`` each, or the adaptive split of the layer's total (at most ``max_count``)."""
        flat = attention.shape[0]
        uniform = torch.full((flat,), count, dtype=torch.long, device=attention.device)
        if self.head_budgets == "uniform":
            return uniform
        share = attention.mean(dim=1).masked_fill(~valid, 0.0)
        ranked = share.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        need = ((ranked < self.coverage * ranked[:, -1:]).sum(dim=-1) + 1).float().reshape(batch, -1)
        total = count * need.shape[1]
        counts = torch.floor(need / need.sum(dim=1, keepdim=True) * total).long()
        return counts.clamp_(1, max_count).reshape(flat)

    def _highest_attention(self, attention: torch.Tensor, valid: torch.Tensor, slots: int) -> torch.Tensor:
        """Indices [flat, slots] of the most attended keys, best first."""
        return key_scores(attention, self.score).masked_fill(~valid, -1.0).topk(slots, dim=-1).indices

    def _omp(self, attention: torch.Tensor, valid: torch.Tensor, slots: int) -> torch.Tensor:
        """Greedy orthogonal matching pursuit on the mass targets; indices [flat, slots] in selection order.

        Each step adds the keys most correlated with the residual of the mass fit (design
        ``attention`` [flat, n, tokens], target all ones) and refits the weights of all keys
        chosen so far; the normal equations grow by the new keys' rows only, instead of being
        rebuilt from the whole design.
        """
        step = self.omp_keys_per_step or max(1, math.ceil(slots / 32))
        flat, queries, _ = attention.shape
        target = attention.new_ones(flat, queries)
        available = valid.clone()
        chosen = torch.empty(flat, 0, dtype=torch.long, device=attention.device)
        design = attention.new_empty(flat, queries, 0)
        gram = attention.new_empty(flat, 0, 0)
        moment = attention.new_empty(flat, 0)
        residual = target
        while chosen.shape[1] < slots:
            take = min(step, slots - chosen.shape[1])
            correlation = torch.einsum("fnt,fn->ft", attention, residual)
            # Chosen and masked entries are excluded (masked ones are taken only if nothing else is left).
            correlation = correlation.masked_fill(~available, float("-inf"))
            fresh = correlation.topk(take, dim=-1).indices
            available.scatter_(1, fresh, False)
            chosen = torch.cat([chosen, fresh], dim=1)
            columns = torch.gather(attention, 2, fresh.unsqueeze(1).expand(-1, queries, -1))  # [flat, n, take]
            design = torch.cat([design, columns], dim=2)
            cross = design.transpose(1, 2) @ columns  # the Gram matrix's new columns: [old; new] x new
            gram = torch.cat([torch.cat([gram, cross[:, :-take].transpose(1, 2)], dim=1), cross], dim=2)
            moment = torch.cat([moment, columns.sum(dim=1)], dim=1)  # design^T target, with target all ones
            weights = nonnegative_least_squares_normal(gram, moment, 0)
            residual = target - (design @ weights.unsqueeze(-1)).squeeze(-1)
        return chosen

    def _fit_values(self, weighted: torch.Tensor, targets: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Least-squares values [flat, t, dv] for softmax rows ``weighted`` (unnormalised) and targets [flat, n, dv]."""
        rows = weighted / weighted.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        gram = rows.transpose(1, 2) @ rows
        # A floor keeps the system solvable when there are fewer queries than keys.
        strength = (self.ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=-1)).clamp_min(1e-10)
        identity = torch.eye(gram.shape[-1], device=gram.device).unsqueeze(0)
        system = gram + strength.view(-1, 1, 1) * identity
        right = rows.transpose(1, 2) @ targets + strength.view(-1, 1, 1) * anchor
        return solve_positive_definite(system, right, anchor)
