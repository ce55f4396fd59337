"""dynamic_precision_am: mixed precision for the kept tokens, an Attention Matching summary of the evicted ones."""

import math

import pytest
import torch

from metakv_cl.kv import KVStorage, QuantizedTensor, get_method
from metakv_cl.kv.methods.attention_matching import attention_outputs


def diffuse_block(seed=0, heads=2, tokens=512, dim=32, queries=256):
    """Keys that spread attention over many tokens (eviction loses much of it), values off zero, and two
    independent sets of queries from one distribution: reference queries to compact with, and fresh ones to test on."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, tokens, dim, generator=generator)
    values = torch.randn(1, heads, tokens, dim, generator=generator) + 1.0
    reference = torch.randn(1, heads, queries, dim, generator=generator) / math.sqrt(dim)
    fresh = torch.randn(1, heads, queries, dim, generator=generator) / math.sqrt(dim)
    return keys, values, reference, fresh


def output_error(result, queries, keys, values) -> float:
    _, exact = attention_outputs(queries, keys, values)
    _, output = attention_outputs(queries, KVStorage.wrap(result.keys).to_float(), KVStorage.wrap(result.values).to_float(),
                                  result.bias)
    return float((output - exact).norm(dim=-1).mean() / exact.norm(dim=-1).mean())


def held_bytes(result) -> int:
    bias = 0 if result.bias is None else result.bias.nbytes
    return KVStorage.wrap(result.keys).nbytes + KVStorage.wrap(result.values).nbytes + bias


@pytest.mark.parametrize("max_entries", [None, 512])
def test_budget_one_returns_the_inputs_themselves(max_entries):
    keys, values, reference, _ = diffuse_block()
    result = get_method("dynamic_precision_am").compact(keys, values, reference, 1.0, max_entries=max_entries)
    assert result.keys is keys and result.values is values and result.bias is None
    assert torch.equal(result.kept, torch.arange(512).expand(1, 2, 512))


@pytest.mark.parametrize("budget", [0.5, 0.2, 0.1, 0.05, 0.02])
@pytest.mark.parametrize("shares", [(0.25,), (0.0, 0.1, 0.25, 0.5)])
def test_keys_values_and_bias_together_fit_the_budget(budget, shares):
    keys, values, reference, _ = diffuse_block()
    result = get_method("dynamic_precision_am", summary_shares=shares).compact(keys, values, reference, budget)
    assert held_bytes(result) <= budget * (keys.nbytes + values.nbytes)
    entries = KVStorage.wrap(result.keys).seq_len
    assert KVStorage.wrap(result.values).seq_len == entries == result.kept.shape[-1]
    if shares == (0.25,) and budget <= 0.2:  # a forced summary (at 50 % quantization keeps every token: none needed)
        assert result.bias is not None and result.bias.shape == (1, 2, entries)
        summary = KVStorage.wrap(result.keys).segments[-1]
        assert isinstance(summary, torch.Tensor) and summary.shape[-2] >= 1
        assert held_bytes(result) >= 0.8 * budget * (keys.nbytes + values.nbytes)  # and the budget is used


def test_summary_entries_reuse_evicted_keys_with_fitted_bias():
    keys, values, reference, _ = diffuse_block()
    result = get_method("dynamic_precision_am", summary_shares=(0.25,)).compact(keys, values, reference, 0.1)
    segments = KVStorage.wrap(result.keys).segments
    count = segments[-1].shape[-2]
    kept_tokens, summary_tokens = result.kept[..., :-count], result.kept[..., -count:]
    for head in range(2):  # summary entries stand for evicted tokens: none of them is also kept
        assert not set(summary_tokens[0, head].tolist()) & set(kept_tokens[0, head].tolist())
    assert torch.equal(segments[-1], torch.gather(keys, 2, summary_tokens.unsqueeze(-1).expand(-1, -1, -1, 32)))
    assert torch.all(result.bias[..., :-count] == 0) and torch.all(result.bias[..., -count:] != 0)
    assert any(isinstance(s, QuantizedTensor) for s in segments)  # the kept tokens are quantized


def test_without_summary_and_with_tracked_relevance_it_is_dynamic_precision():
    keys, values, reference, _ = diffuse_block()
    importance = torch.rand(1, 2, 512, generator=torch.Generator().manual_seed(1))
    for budget in (0.3, 0.1):
        ours = get_method("dynamic_precision_am", summary_shares=(0.0,), relevance="tracked").compact(
            keys, values, reference, budget, importance=importance)
        theirs = get_method("dynamic_precision").compact(keys, values, reference, budget, importance=importance)
        assert torch.equal(ours.kept, theirs.kept) and ours.bias is None
        assert torch.equal(KVStorage.wrap(ours.keys).to_float(), KVStorage.wrap(theirs.keys).to_float())
        assert torch.equal(KVStorage.wrap(ours.values).to_float(), KVStorage.wrap(theirs.values).to_float())


@pytest.mark.parametrize("seed", [0, 1])
def test_the_combination_attends_better_than_either_part_on_fresh_queries(seed):
    """Diffuse attention: evicting loses mass that a fitted summary restores, and quantization keeps more tokens than
    Attention Matching's full-precision entries. On queries never seen by the fit, the combination's attention output
    is closer to the full cache's than the precision plan alone (a clear margin: the summary is used and works) and
    than Attention Matching alone."""
    keys, values, reference, fresh = diffuse_block(seed)
    combined = output_error(get_method("dynamic_precision_am").compact(keys, values, reference, 0.1), fresh, keys, values)
    precision_only = output_error(get_method("dynamic_precision_am", summary_shares=(0.0,)).compact(keys, values, reference, 0.1),
                                  fresh, keys, values)
    matching_only = output_error(get_method("attention_matching").compact(keys, values, reference, 0.1), fresh, keys, values)
    assert combined < 0.8 * precision_only
    assert combined < matching_only


def test_options_are_checked():
    with pytest.raises(ValueError, match="summary_shares"):
        get_method("dynamic_precision_am", summary_shares=(0.0, 1.0))
    with pytest.raises(ValueError, match="relevance"):
        get_method("dynamic_precision_am", relevance="nope")
    assert not get_method("dynamic_precision_am").tracks_attention
    assert get_method("dynamic_precision_am", relevance="tracked").tracks_attention
