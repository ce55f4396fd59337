"""CompactedCache inside real (tiny) models: exactness, the bias in attention, bytes, positions, errors."""

import math

import pytest
import torch
from transformers import DynamicCache

from kv_helpers import METHODS, TOKEN_METHODS, build, token_ids, with_meta_kv
from metakv_cl.kv import (
    MASKED_BIAS,
    CompactedCache,
    chunked_prefill,
    disable_compacted_attention,
    enable_compacted_attention,
    stream_log_likelihood,
)
from metakv_cl.transformers_api import with_cache
from metakv_cl.testing import tiny_gpt2, tiny_llama


def stock_logits(model, context, continuation):
    cache = DynamicCache(config=model.config)
    model(context, **with_cache(model, cache), use_cache=True)
    return model(continuation, **with_cache(model, cache), use_cache=True).logits


def cache_logits(model, cache, continuation):
    positions = cache.position_ids(continuation.shape[1], continuation.shape[0])
    return model(continuation, **with_cache(model, cache), position_ids=positions, use_cache=True).logits


@torch.no_grad()
@pytest.mark.parametrize("meta_kv", [False, True], ids=["plain", "meta_kv"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_at_full_budget_reproduces_the_full_cache(architecture, method, meta_kv):
    model = build(architecture)
    if meta_kv:
        with_meta_kv(model)  # the dynamic meta-state must carry over the compaction too
    context, continuation = token_ids(2, 40), token_ids(2, 6, seed=1)
    reference = model(torch.cat([context, continuation], dim=1)).logits[:, 40:]  # one full forward
    cache = CompactedCache(method, None if method == "full" else 64, config=model.config)
    chunked_prefill(model, cache, context, chunk_size=16)
    cache.compact(1.0)  # the method itself runs, at a 100% budget
    assert cache.get_seq_length() == 40
    torch.testing.assert_close(cache_logits(model, cache, continuation), reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_zero_bias_gives_exactly_the_stock_result(architecture, attn_implementation):
    model = build(architecture, attn_implementation)
    context, continuation = token_ids(2, 24), token_ids(2, 5, seed=1)
    reference = stock_logits(model, context, continuation)
    cache = CompactedCache("full", config=model.config)
    chunked_prefill(model, cache, context)
    for layer in cache.layers:
        layer.set_entries(layer.keys, layer.values, torch.zeros(layer.keys.shape[:3]))
    assert torch.equal(cache_logits(model, cache, continuation), reference)
    assert model.config._attn_implementation == f"kv_compact_{attn_implementation}"
    disable_compacted_attention(model)
    assert model.config._attn_implementation == attn_implementation


@torch.no_grad()
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_bias_log_w_counts_an_entry_w_times_and_masked_bias_removes_it(architecture, attn_implementation):
    """Two copies of an entry attend exactly like one copy with bias log 2 (and MASKED_BIAS like none)."""
    model = build(architecture, attn_implementation)
    context, continuation = token_ids(2, 20), token_ids(2, 4, seed=1)
    source = CompactedCache("full", config=model.config)
    chunked_prefill(model, source, context)
    positions = torch.arange(20, 24).expand(2, 4)

    def run(edit):
        cache = CompactedCache("full", config=model.config)
        chunked_prefill(model, cache, context)
        for layer, original in zip(cache.layers, source.layers):
            edit(layer, original.keys, original.values)
        return model(continuation, **with_cache(model, cache), position_ids=positions, use_cache=True).logits

    def duplicated(layer, keys, values):
        layer.set_entries(torch.cat([keys, keys[:, :, 7:8]], dim=2), torch.cat([values, values[:, :, 7:8]], dim=2))

    def weighted(layer, keys, values):
        bias = torch.zeros(keys.shape[:3])
        bias[:, :, 7] = math.log(2.0)
        layer.set_entries(keys, values, bias)

    def removed(layer, keys, values):
        keep = [i for i in range(keys.shape[2]) if i != 7]
        layer.set_entries(keys[:, :, keep], values[:, :, keep])

    def masked(layer, keys, values):
        bias = torch.zeros(keys.shape[:3])
        bias[:, :, 7] = MASKED_BIAS
        layer.set_entries(keys, values, bias)

    torch.testing.assert_close(run(weighted), run(duplicated), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(masked), run(removed), atol=1e-5, rtol=1e-5)
    assert (run(weighted) - run(removed)).abs().max() > 1e-3  # the bias does change the output


@torch.no_grad()
def test_captured_queries_are_the_scaled_post_rope_attention_queries(architecture):
    model = build(architecture, "eager")
    context = token_ids(2, 12)
    cache = CompactedCache("attention_matching", 64, config=model.config)
    enable_compacted_attention(model)
    output = model(context, **with_cache(model, cache), use_cache=True, output_attentions=True)
    layer = cache.layers[1]
    keys, queries = layer.keys, layer.reference_queries  # queries [b, kv_heads, tokens * groups, d]
    batch, kv_heads, rows, _ = queries.shape
    groups = rows // context.shape[1]
    scores = (queries @ keys.transpose(-1, -2)).reshape(batch, kv_heads, context.shape[1], groups, -1)
    scores = scores.transpose(2, 3).reshape(batch, kv_heads * groups, context.shape[1], -1)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, output.attentions[1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_reported_bytes_are_the_bytes_held(architecture, method):
    model = build(architecture)
    capacity, chunk = 96, 16
    cache = CompactedCache(method, capacity, config=model.config)
    chunked_prefill(model, cache, token_ids(2, 240), chunk_size=chunk)
    assert cache.stats()["compactions"] > 0
    kept_share = capacity / cache.seen_tokens
    for layer in cache.layers:
        # Layer-wise budgets (PyramidKV): a layer whose share grows as the cache reads holds its final share.
        capacity = 96 * max(1.0, cache.method.layer_share(layer.layer_idx, cache.layer_count(), kept_share))
        held = layer.tensors()
        # Each tensor owns its storage (no slice keeps a larger base alive) and none is shared.
        assert sum(t.untyped_storage().nbytes() for t in held) == layer.nbytes
        assert len({t.untyped_storage().data_ptr() for t in held}) == len(held)
        # Within the capacity (plus one chunk at the peak), allowing the bias: a float per entry and KV head.
        bias_allowance = (capacity + chunk) * 2 * layer.keys.shape[1] * 4
        assert layer.peak_bytes <= (capacity + chunk) * layer.full_token_bytes + bias_allowance
        assert layer.nbytes <= capacity * layer.full_token_bytes + bias_allowance
    assert cache.nbytes == sum(layer.nbytes for layer in cache.layers)
    if method in ("int8", "int4", "dynamic_precision") and architecture == "llama":
        assert all(layer.key_storage.is_quantized for layer in cache.layers)
        assert cache.get_seq_length() > capacity  # quantized entries: more tokens in the same bytes


@torch.no_grad()
def test_chunked_prefill_reads_far_past_gpt2_positions():
    model = tiny_gpt2()  # 128 learned positions
    seen = []
    model.transformer.wpe.register_forward_hook(lambda module, inputs, output: seen.append(int(inputs[0].max())))
    cache = CompactedCache("sinks_window", 48, config=model.config)
    assert cache.position_policy == "kept"
    nll, scored, logits = stream_log_likelihood(model, cache, token_ids(2, 700), score_from=600, chunk_size=16)
    assert max(seen) < 48 + 16 <= 128
    assert cache.seen_tokens == 700 and cache.get_seq_length() <= 48
    assert scored == 2 * 100 and math.isfinite(nll) and logits.shape == (2, model.config.vocab_size)
    assert cache.next_position() == cache.get_seq_length()  # new tokens continue from the kept count


@torch.no_grad()
def test_learned_position_limits_are_checked():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="learned positions"):
        chunked_prefill(model, CompactedCache("sliding_window", 120, config=model.config), token_ids(1, 300), chunk_size=16)
    with pytest.raises(ValueError, match="learned positions"):
        chunked_prefill(model, CompactedCache("full", config=model.config), token_ids(1, 300))


@torch.no_grad()
def test_rope_positions_continue_the_original_count():
    """With the 'seen' policy, a window of RoPE keys attends exactly as the same tokens at their true positions."""
    model = tiny_llama(num_hidden_layers=1)  # one layer: keys depend on the token and its position only
    ids = token_ids(1, 121)
    cache = CompactedCache("sliding_window", 32, config=model.config, headroom=0.0)
    assert cache.position_policy == "seen"
    chunked_prefill(model, cache, ids[:, :120], chunk_size=8)
    assert cache.next_position() == 120 and cache.get_seq_length() <= 32
    logits = cache_logits(model, cache, ids[:, 120:])
    kept = cache.get_seq_length()  # the window, the new token included (it may have evicted one more)
    window = ids[:, 121 - kept : 121]
    reference = model(window, position_ids=torch.arange(121 - kept, 121).unsqueeze(0)).logits[:, -1:]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    # Positions as if counted from the cache size would not give this: RoPE sees the gap.
    shifted = CompactedCache("sliding_window", 32, config=model.config, headroom=0.0, position_policy="kept")
    chunked_prefill(model, shifted, ids[:, :120], chunk_size=8)
    assert (cache_logits(model, shifted, ids[:, 120:]) - reference).abs().max() > 1e-3


@torch.no_grad()
def test_kept_policy_on_a_rope_model_restarts_positions_at_the_cache_size():
    model = tiny_llama()
    cache = CompactedCache("sliding_window", 32, config=model.config, position_policy="kept")
    chunked_prefill(model, cache, token_ids(1, 100), chunk_size=8)
    assert cache.next_position() == cache.get_seq_length() <= 32
    assert cache.position_ids(3)[0].tolist() == list(range(cache.get_seq_length(), cache.get_seq_length() + 3))


@torch.no_grad()
def test_padding_is_masked_in_the_bias_and_survives_compaction():
    model = tiny_llama()
    ids = token_ids(2, 40)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0  # row 1 is left-padded
    cache = CompactedCache("sinks_window", 24, config=model.config, sinks=4)
    enable_compacted_attention(model)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    for start in range(0, 40, 8):  # the model sees the padding mask of each chunk
        model(ids[:, start : start + 8], attention_mask=mask[:, : start + 8], position_ids=positions[:, start : start + 8],
              **with_cache(model, cache), use_cache=True)
    layer = cache.layers[0]
    assert layer.compactions > 0
    assert torch.all(layer.bias[1, :, :4] == MASKED_BIAS)  # the sinks of row 1 are padding
    assert torch.all(layer.bias[0] == 0) and torch.all(layer.bias[1, :, 4:] == 0)


@torch.no_grad()
def test_repeat_queries_add_reference_queries_without_changing_the_cache():
    model = tiny_llama()
    ids = token_ids(1, 64)
    plain = CompactedCache("attention_matching", 1000, config=model.config, reference_queries=4096)
    chunked_prefill(model, plain, ids, chunk_size=16)
    probed = CompactedCache("attention_matching", 1000, config=model.config, reference_queries=4096)
    chunked_prefill(model, probed, ids, chunk_size=16, repeat_queries=True)
    assert probed.get_seq_length() == plain.get_seq_length() == 64 and probed.seen_tokens == 64
    for a, b in zip(plain.layers, probed.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-6)
        assert b.reference_queries.shape[2] == 2 * a.reference_queries.shape[2]


@torch.no_grad()
def test_a_model_without_the_attention_wrapper_is_refused():
    model = tiny_gpt2()
    cache = CompactedCache("attention_matching", 32, config=model.config)
    model(token_ids(1, 8), **with_cache(model, cache), use_cache=True)
    with pytest.raises(RuntimeError, match="enable_compacted_attention"):
        model(token_ids(1, 4), **with_cache(model, cache), use_cache=True)


def test_bad_cache_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown KV compaction method"):
        CompactedCache("nope", 10)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        CompactedCache("h2o", 0)
    with pytest.raises(ValueError, match="headroom"):
        CompactedCache("h2o", 10, headroom=1.0)
    with pytest.raises(ValueError, match="position_policy"):
        CompactedCache("h2o", 10, position_policy="absolute")
    with pytest.raises(ValueError, match="KVCompressor"):
        CompactedCache(object(), 10)
    cache = CompactedCache("h2o", 10)
    with pytest.raises(ValueError, match="budget"):
        cache.compact(0.0)


def test_a_flash_attention_model_is_refused():
    model = tiny_gpt2()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="sdpa or eager"):
        enable_compacted_attention(model)


@torch.no_grad()
def test_relevance_keeps_being_updated_while_decoding():
    model = tiny_llama()
    cache = CompactedCache("dynamic_precision", 64, config=model.config, decay=0.5)
    chunked_prefill(model, cache, token_ids(1, 40), chunk_size=8)
    layer = cache.layers[0]
    before = layer.importance.clone()
    assert torch.all(before[..., :-8] < 1.0) and torch.all(before[..., -8:] <= 1.0)  # older tokens have decayed
    cache_logits(model, cache, token_ids(1, 1, seed=2))  # one decoding step
    after = layer.importance
    assert after.shape[-1] == 41 and torch.all(after[..., -1] > 0.5)  # the new token starts fully relevant
    # Every old token's relevance moved by the EMA: half its old value plus half the attention it got now.
    assert torch.all((after[..., :40] - 0.5 * before).abs() <= 0.5 + 1e-6)
    assert not torch.allclose(after[..., :40], before)


def test_a_token_is_priced_at_its_key_and_value_dtypes():
    # Under autocast, RoPE keys come out float32 while values stay bfloat16: the budget must price each
    # at its own width, or a "96-token" cache holds a third more entries than it says.
    model = tiny_llama()
    cache = CompactedCache("sliding_window", 96, config=model.config)
    keys = torch.randn(2, 2, 10, 16, dtype=torch.float32)
    values = torch.randn(2, 2, 10, 16, dtype=torch.bfloat16)
    cache.update(keys, values, 0)
    layer = cache.layers[0]
    assert layer.nbytes == 10 * layer.full_token_bytes
