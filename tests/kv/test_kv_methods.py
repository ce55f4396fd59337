"""Every registered method against the protocol: identity at full budget, budgets, caps, errors."""

import math

import pytest
import torch

from metakv_cl.kv import MASKED_BIAS, CompactedKV, KVCompressor, KVStorage, QuantizedTensor, get_method
from metakv_cl.kv.protocol import AttentionReceived

from kv_helpers import METHODS, TOKEN_METHODS


def block(batch=2, heads=3, tokens=96, dim=16, queries=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, tokens, dim, generator=generator)
    values = torch.randn(batch, heads, tokens, dim, generator=generator)
    reference = torch.randn(batch, heads, queries, dim, generator=generator) / math.sqrt(dim)
    importance = torch.rand(batch, heads, tokens, generator=generator)
    return keys, values, reference, importance


def stored_bytes(x) -> int:
    return KVStorage.wrap(x).nbytes


def entries(x) -> int:
    return KVStorage.wrap(x).seq_len


def test_registry_lists_every_family():
    expected = {"attention_matching", "dynamic_precision", "dynamic_precision_am", "full", "sliding_window", "sinks_window", "h2o", "random",
                "int8", "int4", "moving_average", "cumulative_average", "compressive_memory", "snapkv", "pyramidkv", "tova",
                "h2o_refit"}
    assert expected == set(METHODS)
    assert all(isinstance(get_method(name), KVCompressor) for name in METHODS)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown KV compaction method 'nope'.*attention_matching.*sliding_window"):
        get_method("nope")


def test_bad_method_arguments_are_reported():
    with pytest.raises(ValueError, match="bad arguments for KV compaction method 'h2o'"):
        get_method("h2o", no_such_option=1)
    with pytest.raises(ValueError, match="recent_fraction"):
        get_method("h2o", recent_fraction=2.0)
    with pytest.raises(ValueError, match="selection"):
        get_method("attention_matching", selection="best")


@pytest.mark.parametrize("method", METHODS)
def test_full_budget_returns_the_inputs(method):
    keys, values, reference, importance = block()
    result = get_method(method).compact(keys, values, reference, 1.0, importance=importance)
    assert result.keys is keys and result.values is values and result.bias is None
    unpacked_keys, unpacked_values, bias = result  # the protocol's 3-tuple
    assert unpacked_keys is keys and unpacked_values is values and bias is None


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan"), "half"])
@pytest.mark.parametrize("method", METHODS)
def test_budget_outside_unit_interval_is_rejected(method, budget):
    keys, values, reference, _ = block(tokens=8)
    with pytest.raises(ValueError, match="budget"):
        get_method(method).compact(keys, values, reference, budget)


@pytest.mark.parametrize("method", METHODS)
def test_shape_mismatches_are_rejected(method):
    keys, values, reference, importance = block(tokens=8)
    compressor = get_method(method)
    with pytest.raises(ValueError, match="disagree"):
        compressor.compact(keys, values[:, :, :5], reference, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        compressor.compact(keys[0], values[0], reference, 0.5)
    with pytest.raises(ValueError, match="queries must be"):
        compressor.compact(keys, values, reference[..., :4], 0.5)
    with pytest.raises(ValueError, match="importance must be"):
        compressor.compact(keys, values, reference, 0.5, importance=importance[..., :3])
    with pytest.raises(ValueError, match="max_entries"):
        compressor.compact(keys, values, reference, 0.5, max_entries=0)


@pytest.mark.parametrize("budget", [0.5, 0.2, 0.05])
@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_compaction_fits_the_budget(method, budget):
    keys, values, reference, importance = block()
    result = get_method(method).compact(keys, values, reference, budget, importance=importance)
    assert isinstance(result, CompactedKV)
    full_bytes = keys.nbytes + values.nbytes
    payload = stored_bytes(result.keys) + stored_bytes(result.values)
    assert payload <= budget * full_bytes + 1e-6
    count = entries(result.keys)
    assert count == entries(result.values) >= 1
    if result.bias is not None:
        assert result.bias.shape == (2, 3, count) and result.bias.dtype == torch.float32
    if not KVStorage.wrap(result.keys).is_quantized:
        assert count == max(1, math.floor(budget * keys.shape[-2]))  # token methods keep floor(budget * tokens)


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_entry_cap_is_honoured(method):
    keys, values, reference, importance = block()
    result = get_method(method).compact(keys, values, reference, 1.0, importance=importance, max_entries=20)
    assert 1 <= entries(result.keys) <= 20


def test_kept_indices_point_at_the_kept_tokens():
    keys, values, reference, importance = block()
    for method in ("sliding_window", "sinks_window", "h2o", "random", "attention_matching", "int8"):
        result = get_method(method).compact(keys, values, reference, 0.3, importance=importance)
        restored = torch.gather(keys, 2, result.kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
        assert torch.allclose(KVStorage.wrap(result.keys).to_float(), restored, atol=0.05), method


def test_sliding_window_and_sinks_keep_the_right_tokens():
    keys, values, _, _ = block(tokens=40)
    window = get_method("sliding_window").compact(keys, values, None, 0.25)
    assert window.kept[0, 0].tolist() == list(range(30, 40))
    sinks = get_method("sinks_window", sinks=3).compact(keys, values, None, 0.25)
    assert sinks.kept[0, 0].tolist() == [0, 1, 2] + list(range(33, 40))


def test_h2o_keeps_heavy_hitters_and_the_recent_window():
    keys, values, _, _ = block(tokens=40)
    importance = torch.zeros(2, 3, 40)
    importance[..., [3, 7, 11, 19, 23]] = 5.0  # heavy hitters
    result = get_method("h2o", recent_fraction=0.5).compact(keys, values, None, 0.25, importance=importance)
    assert result.kept[1, 2].tolist() == [3, 7, 11, 19, 23, 35, 36, 37, 38, 39]


def test_random_eviction_is_seeded_and_differs_between_heads():
    keys, values, _, _ = block(tokens=40)
    first = get_method("random", seed=3).compact(keys, values, None, 0.25).kept
    again = get_method("random", seed=3).compact(keys, values, None, 0.25).kept
    assert torch.equal(first, again)
    assert not torch.equal(first[0, 0], first[0, 1])


def test_cumulative_average_is_the_exact_mean_with_its_count_in_the_bias():
    keys, values, _, _ = block(tokens=40)
    result = get_method("cumulative_average").compact(keys, values, None, 0.25)  # 1 summary + 9 recent
    assert torch.allclose(result.keys[..., 0, :], keys[..., :31, :].mean(dim=2), atol=1e-5)
    assert torch.allclose(result.values[..., 1:, :], values[..., 31:, :])
    assert torch.allclose(result.bias[..., 0], torch.full((2, 3), math.log(31.0)))
    assert torch.all(result.bias[..., 1:] == 0)
    # Compacting again continues the same mean: the bias carries the count.
    again = get_method("cumulative_average").compact(result.keys, result.values, None, 0.5, bias=result.bias)
    assert torch.allclose(again.keys[..., 0, :], keys[..., :36, :].mean(dim=2), atol=1e-5)
    assert torch.allclose(again.bias[..., 0].exp(), torch.full((2, 3), 36.0), rtol=1e-5)


def test_moving_average_weights_decay_with_age():
    keys, values, _, _ = block(tokens=12)
    decay = 0.5
    result = get_method("moving_average", decay=decay).compact(keys, values, None, 0.25)  # 1 slot + 2 recent
    weights = decay ** torch.arange(9, -1, -1, dtype=torch.float32)  # 10 evicted tokens, newest weight 1
    expected = (weights[:, None] * keys[0, 0, :10]).sum(0) / weights.sum()
    assert torch.allclose(result.keys[0, 0, 0], expected, atol=1e-5)
    assert math.isclose(float(result.bias[0, 0, 0].exp()), float(weights.sum()), rel_tol=1e-5)


def test_compressive_memory_pools_blocks_and_keeps_the_attention_mass():
    keys, values, _, _ = block(tokens=40)
    method = get_method("compressive_memory", rate=4, memory_fraction=0.5)
    result = method.compact(keys, values, None, 0.5)  # at most 20 entries, a FIFO of at least 10
    weights = result.bias.exp()[0, 0]
    assert entries(result.keys) <= 20
    assert math.isclose(float(weights.sum()), 40.0, rel_tol=1e-5)  # nothing dropped yet
    assert torch.allclose(weights[:7], torch.full((7,), 4.0))  # 7 slots of 4 pooled tokens
    assert torch.allclose(result.keys[..., 0, :], keys[..., :4, :].mean(dim=2), atol=1e-5)
    assert torch.allclose(result.keys[..., -12:, :], keys[..., -12:, :])
    # A second pass keeps the slots as they are, pools one more block (all the room outside
    # the FIFO allows) and, with the memory full, drops the oldest entries.
    second = method.compact(result.keys, result.values, None, 0.5, bias=result.bias)  # 19 -> 9 entries
    assert entries(second.keys) == 9
    assert torch.allclose(second.keys[..., 0, :], keys[..., 28:32, :].mean(dim=2), atol=1e-5)
    assert torch.allclose(second.keys[..., 1:, :], keys[..., 32:, :])
    assert torch.allclose(second.bias.exp()[0, 0], torch.tensor([4.0] + [1.0] * 8))


def test_padding_gets_no_weight_in_merges():
    keys, values, _, _ = block(tokens=12)
    bias = torch.zeros(2, 3, 12)
    bias[..., :2] = MASKED_BIAS  # two padding tokens in front
    result = get_method("cumulative_average").compact(keys, values, None, 0.5, bias=bias)
    assert torch.allclose(result.keys[..., 0, :], keys[..., 2:7, :].mean(dim=2), atol=1e-5)
    assert torch.allclose(result.bias[..., 0].exp(), torch.full((2, 3), 5.0), rtol=1e-5)


def test_kivi_layout_per_channel_keys_per_token_values_full_precision_residual():
    keys, values, _, _ = block(tokens=160)
    result = get_method("int4", group_size=32, residual=32).compact(keys, values, None, 0.5)
    key_parts, value_parts = KVStorage.wrap(result.keys).segments, KVStorage.wrap(result.values).segments
    assert isinstance(key_parts[0], QuantizedTensor) and key_parts[0].axis == "channel" and key_parts[0].bits == 4
    assert isinstance(value_parts[0], QuantizedTensor) and value_parts[0].axis == "token"
    assert isinstance(key_parts[-1], torch.Tensor) and key_parts[-1].shape[-2] >= 32  # the residual stays exact
    assert key_parts[0].seq_len % 32 == 0
    assert entries(result.keys) == 160  # quantizing alone meets a 50% budget
    packed = key_parts[0].packed
    assert packed.dtype == torch.uint8 and packed.shape[-1] == keys.shape[-1] // 2


def test_kivi_requantizing_stored_groups_is_exact():
    keys, values, _, _ = block(tokens=160)
    method = get_method("int8")
    first = method.compact(keys, values, None, 0.6)
    restored_keys, restored_values = KVStorage.wrap(first.keys).to_float(), KVStorage.wrap(first.values).to_float()
    second = method.compact(restored_keys, restored_values, None, 0.6)
    assert torch.allclose(KVStorage.wrap(second.keys).to_float(), restored_keys, atol=1e-5)


def test_dynamic_precision_gives_relevant_tokens_more_bits():
    keys, values, _, _ = block(tokens=64)
    importance = (torch.arange(64, dtype=torch.float32) / 64).pow(3).expand(2, 3, 64)  # later tokens more relevant
    method = get_method("dynamic_precision", bits=(8, 4, 2))
    for budget in (0.6, 0.2, 0.05):
        result = method.compact(keys, values, None, budget, importance=importance)
        parts = KVStorage.wrap(result.keys).segments
        bits = [p.bits if isinstance(p, QuantizedTensor) else 32 for p in parts]
        assert bits == sorted(bits, reverse=True) and len(set(bits)) == len(bits)
        kept, boundary = result.kept[0, 0].tolist(), 0
        for part in parts:  # each precision holds more relevant tokens than the next one down
            level = kept[boundary : boundary + part.shape[-2]]
            boundary += part.shape[-2]
            assert boundary == len(kept) or min(level) > max(kept[boundary:])
        assert set(range(64 - len(kept), 64)) == set(kept)  # whatever is evicted is the least relevant
        payload = stored_bytes(result.keys) + stored_bytes(result.values)
        assert 0.8 * budget * (keys.nbytes + values.nbytes) <= payload <= budget * (keys.nbytes + values.nbytes)
    assert 32 not in bits and len(kept) < 64  # at 5%: the most relevant quantized, the rest evicted
    roomy = method.compact(keys, values, None, 0.6, importance=importance)
    assert isinstance(KVStorage.wrap(roomy.keys).segments[0], torch.Tensor)  # the most relevant stay exact
    assert entries(roomy.keys) >= 60  # (a token with no relevance at all is not worth any byte)


def test_dynamic_precision_spends_bytes_where_relevance_is():
    """More relevance concentration buys full precision for the top tokens instead of bits for all."""
    keys, values, _, _ = block(tokens=64)
    method = get_method("dynamic_precision")
    flat = method.compact(keys, values, None, 0.3, importance=torch.full((2, 3, 64), 0.5))
    peaked = torch.full((2, 3, 64), 1e-4)
    peaked[..., :4] = 1.0
    focused = method.compact(keys, values, None, 0.3, importance=peaked)
    full_tokens = lambda r: sum(p.shape[-2] for p in KVStorage.wrap(r.keys).segments if isinstance(p, torch.Tensor))
    assert full_tokens(focused) >= 4 and full_tokens(flat) == 0


def test_dynamic_precision_relevance_is_an_ema_of_max_pooled_attention():
    method = get_method("dynamic_precision", decay=0.5)
    start = method.initial_importance(torch.zeros(1, 1, 3, 4))
    assert torch.equal(start, torch.ones(1, 1, 3))
    received = AttentionReceived(total=torch.tensor([[[3.0, 0.0, 1.0]]]), peak=torch.tensor([[[0.8, 0.0, 0.4]]]),
                                 latest=torch.tensor([[[0.5, 0.0, 0.5]]]))
    assert torch.allclose(method.update_importance(start, received), torch.tensor([[[0.9, 0.5, 0.7]]]))
    h2o = get_method("h2o")
    assert torch.allclose(h2o.update_importance(torch.zeros(1, 1, 3), received), received.total)


def outlier_block(tokens=256, dim=64, queries=128, seed=0):
    """Keys with a few large channels (as real keys have: they set a per-token quantization scale), values, queries,
    and the attention the queries give each key as its relevance."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 4, tokens, dim, generator=generator)
    keys[..., :4] *= 12
    values = torch.randn(1, 4, tokens, dim, generator=generator)
    reference = torch.randn(1, 4, queries, dim, generator=generator) / math.sqrt(dim)
    relevance = torch.softmax(reference @ keys.transpose(-1, -2), dim=-1).sum(dim=2)
    return keys, values, reference, relevance


@pytest.mark.parametrize("budget", [0.1, 0.05])
def test_dynamic_precision_does_not_collapse_to_two_bits(budget):
    """Adding a 2-bit tier must not make attention worse than 8 and 4 bits alone (issue 20: 57 vs 17 perplexity at 10 %).

    With a fixed distortion per bit width, 2 bits looked nearly free and most tokens went there;
    measured in attention, a 2-bit key of a token with outlier channels shifts scores by more
    than evicting the token costs.
    """
    from metakv_cl.kv.methods.attention_matching import attention_outputs

    keys, values, reference, relevance = outlier_block()
    _, exact = attention_outputs(reference, keys, values)

    def output_error(bits):
        result = get_method("dynamic_precision", bits=bits).compact(keys, values, reference, budget, importance=relevance)
        _, output = attention_outputs(reference, KVStorage.wrap(result.keys).to_float(),
                                      KVStorage.wrap(result.values).to_float(), result.bias)
        return float((output - exact).norm(dim=-1).mean() / exact.norm(dim=-1).mean())

    assert output_error((8, 4, 2)) <= 1.05 * output_error((8, 4))


def test_dynamic_precision_measures_two_bits_as_worse_than_eviction_on_outlier_keys():
    keys, values, reference, _ = outlier_block()
    distortion = get_method("dynamic_precision", bits=(8, 4, 2)).distortions(keys, values, reference).mean(dim=(0, 1, 2))
    evicted, two, four, eight, full = distortion.tolist()
    assert evicted == 1.0 and full == 0.0 and two > evicted and eight < four < two


def test_snapkv_keeps_its_window_and_what_the_window_attends_to():
    keys, values, _, _ = block(batch=1, heads=2, tokens=40)
    queries = torch.zeros(1, 2, 8 * 2, 16)  # the last 8 tokens, 2 query heads each
    queries[..., :] = 20.0 * keys[:, :, 5:6] / keys[:, :, 5:6].norm(dim=-1, keepdim=True)  # everyone looks at token 5
    method = get_method("snapkv", window=8, kernel_size=1)
    result = method.compact(keys, values, queries, 0.25, query_groups=2)  # 10 kept: 8 window + 2 chosen
    for head in range(2):
        kept = result.kept[0, head].tolist()
        assert kept[-8:] == list(range(32, 40)) and 5 in kept[:2]
    pooled = get_method("snapkv", window=8, kernel_size=3).token_scores(keys, queries, None, 2)
    assert pooled[0, 0, 4] > 0 and pooled[0, 0, 6] > 0  # pooling spreads the score to the neighbours
    with pytest.raises(ValueError, match="queries of the last tokens"):
        method.compact(keys, values, None, 0.25)
    with pytest.raises(ValueError, match="kernel_size"):
        get_method("snapkv", kernel_size=4)


def test_pyramidkv_budgets_shrink_with_depth_keep_the_mean_and_are_whole_at_full_budget():
    method = get_method("pyramidkv", beta=20)
    for budget in (0.02, 0.1, 0.5, 0.8):
        shares = [method.layer_share(layer, 30, budget) for layer in range(30)]
        assert shares == sorted(shares, reverse=True) and math.isclose(sum(shares) / 30, 1.0)
        assert max(shares) * budget <= 1.0 + 1e-9
    assert math.isclose(method.layer_share(29, 30, 0.1), 1 / 20)
    assert all(method.layer_share(layer, 30, 1.0) == 1.0 for layer in range(30))
    with pytest.raises(ValueError, match="beta"):
        get_method("pyramidkv", beta=1.0)


def test_tova_ranks_by_the_latest_query_averaged_over_heads():
    keys, values, _, _ = block(batch=1, heads=2, tokens=10)
    method = get_method("tova")
    latest = torch.zeros(1, 2, 10)
    latest[0, 0, 3], latest[0, 1, 7] = 0.9, 0.5  # head averages: token 3 first, then token 7
    received = AttentionReceived(total=torch.ones(1, 2, 10), peak=torch.ones(1, 2, 10), latest=latest)
    importance = method.update_importance(torch.full((1, 2, 10), 5.0), received)
    assert torch.equal(importance, latest)  # replaced, not accumulated
    result = method.compact(keys, values, None, 0.2, importance=importance)
    assert result.kept[0, 0].tolist() == result.kept[0, 1].tolist() == [3, 7]
