"""Attention Matching on real keys, values and queries: it must match attention better than its keys alone."""

import pytest
import torch

from metakv_cl.kv import MASKED_BIAS, get_method
from metakv_cl.kv.methods.attention_matching import attention_outputs, nonnegative_least_squares


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
    first = get_method("attention_matching").compact(keys, values, queries, 0.5)
    second = get_method("attention_matching").compact(first.keys, first.values, queries, 0.5, bias=first.bias)
    target_mass, _ = attention_outputs(queries, first.keys, first.values, first.bias)
    mass, _ = attention_outputs(queries, second.keys, second.values, second.bias)
    assert float((mass - target_mass).abs().mean()) < 0.1


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
