"""One-shot compaction: the context manager, every method at full budget, all layers in one stacked call."""

import copy
import math

import pytest
import torch

from kv_helpers import METHODS, TOKEN_METHODS, build, token_ids
from metakv_cl.kv import (
    CompactedCache,
    chunked_prefill,
    compaction,
    continuation_log_likelihood,
    get_method,
    repeat_prefill,
)
from metakv_cl.kv.protocol import KVCompressor
from metakv_cl.transformers_api import with_cache

STACKABLE = [m for m in TOKEN_METHODS if get_method(m).rows_independent]


def cache_logits(model, cache, continuation):
    positions = cache.position_ids(continuation.shape[1], continuation.shape[0])
    return model(continuation, **with_cache(model, cache), position_ids=positions, use_cache=True).logits


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_every_method_at_full_budget_changes_nothing(architecture, method):
    model = build(architecture)
    context, continuation = token_ids(2, 40), token_ids(2, 6, seed=1)
    reference = model(torch.cat([context, continuation], dim=1)).logits[:, 40:]
    with compaction(model, method, budget=1.0) as cache:
        model(context)
    assert cache.get_seq_length() == 40 and cache.seen_tokens == 40
    torch.testing.assert_close(cache_logits(model, cache, continuation), reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_the_block_prefills_then_compacts_every_layer_once(method):
    model = build("llama")
    context = token_ids(2, 40)
    with compaction(model, method, budget=0.25) as cache:
        model(context)
        assert cache.get_seq_length() == 40  # nothing is compacted inside the block
    by_hand = CompactedCache(get_method(method), None, config=model.config)
    chunked_prefill(model, by_hand, context, chunk_size=40)
    by_hand.compact(0.25)
    for layer, expected in zip(cache.layers, by_hand.layers):
        assert layer.compactions == 1
        torch.testing.assert_close(layer.keys, expected.keys)
    if not cache.layers[0].key_storage.is_quantized:  # a quarter of 40 entries per layer, on average
        assert sum(layer.get_seq_length() for layer in cache.layers) <= 10 * len(cache.layers)
    nll, scored = continuation_log_likelihood(model, cache, model(context).logits[:, -1], token_ids(2, 5, seed=1))
    assert scored == 2 * 5 and math.isfinite(nll)


@torch.no_grad()
def test_a_cache_passed_by_the_caller_is_left_alone_and_an_error_skips_the_compaction():
    model = build("gpt2")
    own = CompactedCache("full", config=model.config)
    with compaction(model, "h2o", budget=0.5) as cache:
        model(token_ids(1, 16), **with_cache(model, own), use_cache=True)
    assert own.get_seq_length() == 16 and cache.get_seq_length() == 0
    with pytest.raises(RuntimeError, match="stop"):
        with compaction(model, "h2o", budget=0.5) as cache:
            model(token_ids(1, 16))
            raise RuntimeError("stop")
    assert cache.get_seq_length() == 16 and cache.layers[0].compactions == 0
    model(token_ids(1, 4))  # the hook is gone: a plain call takes no cache from the block
    assert cache.get_seq_length() == 16
    with pytest.raises(ValueError, match="budget"):
        with compaction(model, "h2o", budget=1.5):
            pass


@torch.no_grad()
def test_compaction_stacks_layers_only_off_the_cpu_by_default(monkeypatch):
    model = build("llama")
    prefilled = CompactedCache(get_method("h2o"), None, config=model.config)
    chunked_prefill(model, prefilled, token_ids(1, 32), chunk_size=16)
    stacked_calls = []
    original = CompactedCache._compact_stacked
    monkeypatch.setattr(CompactedCache, "_compact_stacked",
                        staticmethod(lambda *a: stacked_calls.append(1) or original(*a)))
    assert not prefilled.on_accelerator()
    copy.deepcopy(prefilled).compact(0.5)
    assert stacked_calls == []  # keys on the CPU: layer by layer
    monkeypatch.setattr(CompactedCache, "on_accelerator", lambda self: True)
    copy.deepcopy(prefilled).compact(0.5)
    assert stacked_calls == [1]  # keys on an accelerator: one stacked call


@torch.no_grad()
@pytest.mark.parametrize("method", STACKABLE + ["attention_matching:omp"])
def test_stacked_layers_give_the_per_layer_result(method, monkeypatch):
    name, _, selection = method.partition(":")
    options = {"selection": selection} if selection else {}
    model = build("llama")
    prefilled = CompactedCache(get_method(name, **options), None, config=model.config)
    chunked_prefill(model, prefilled, token_ids(2, 48), chunk_size=16)
    calls = []
    original = KVCompressor.compact
    monkeypatch.setattr(KVCompressor, "compact", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    stacked, looped = copy.deepcopy(prefilled), copy.deepcopy(prefilled)
    stacked.compact(0.25, batch_layers=True)
    layer_budgets = {get_method(name).layer_share(index, 2, 0.25) for index in range(2)}
    assert len(calls) == len(layer_budgets)  # layers of one budget in one call
    looped.compact(0.25, batch_layers=False)
    assert len(calls) == len(layer_budgets) + len(looped.layers)
    for a, b in zip(stacked.layers, looped.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)
        assert (a.bias is None) == (b.bias is None)
        if a.bias is not None:
            torch.testing.assert_close(a.bias, b.bias, atol=1e-4, rtol=1e-4)
        held = a.tensors()  # the stacked result was split into tensors that own their storage
        assert sum(t.untyped_storage().nbytes() for t in held) == a.nbytes


@torch.no_grad()
@pytest.mark.parametrize("method", ["h2o", "dynamic_precision", "tova", "snapkv"])
def test_one_prefill_serves_every_method(method):
    """A cache read for Attention Matching (queries, no attention statistics) compacts with any other method."""
    model = build("llama")
    prefilled = CompactedCache("attention_matching", None, config=model.config, reference_queries=4096)
    chunked_prefill(model, prefilled, token_ids(2, 48), chunk_size=16)
    assert prefilled.layers[0].importance is None
    cache = copy.deepcopy(prefilled)
    cache.compact(0.25, method=method)
    for layer in cache.layers:
        payload = layer.key_storage.nbytes + layer.value_storage.nbytes
        assert 0 < payload <= 0.25 * 48 * layer.full_token_bytes
    with pytest.raises(ValueError, match="unknown KV compaction method"):
        cache.compact(0.5, method="nope")


@torch.no_grad()
def test_spread_sampling_keeps_evenly_spaced_tokens_of_the_whole_context():
    model = build("llama")  # 2 query heads per KV head
    spread = CompactedCache("attention_matching", None, config=model.config, reference_queries=32)
    recent = CompactedCache("attention_matching", None, config=model.config, reference_queries=32, query_sampling="recent")
    everything = CompactedCache("attention_matching", None, config=model.config, reference_queries=4096)
    ids = token_ids(1, 100)
    for cache in (spread, recent, everything):
        chunked_prefill(model, cache, ids, chunk_size=7)
    all_rows = everything.layers[1].reference_queries.reshape(1, 2, 100, 2, -1)
    # 100 tokens into room for 16: the stride doubles to 8, keeping tokens 0, 8, ..., 96.
    expected = all_rows[:, :, ::8].reshape(1, 2, -1, all_rows.shape[-1])
    torch.testing.assert_close(spread.layers[1].reference_queries, expected)
    torch.testing.assert_close(recent.layers[1].reference_queries, all_rows[:, :, -16:].reshape(1, 2, -1, all_rows.shape[-1]))


@torch.no_grad()
def test_repeat_prefill_keeps_the_queries_of_the_context_read_after_itself():
    model = build("llama")
    context = token_ids(2, 40)
    method = get_method("attention_matching", reference="repeat")
    repeated = CompactedCache(method, None, config=model.config, reference_queries=10_000)
    chunked_prefill(model, repeated, context, chunk_size=16)
    repeat_prefill(model, repeated, context, chunk_size=16)
    assert repeated.get_seq_length() == 40 and repeated.seen_tokens == 40  # the second reading is dropped
    twice = CompactedCache(get_method("attention_matching"), None, config=model.config, reference_queries=10_000)
    chunked_prefill(model, twice, torch.cat([context, context], dim=1), chunk_size=16)
    for layer, expected in zip(repeated.layers, twice.layers):
        groups = layer.query_groups
        assert layer.reference_queries.shape[-2] == 40 * groups  # only the second reading's queries
        torch.testing.assert_close(layer.reference_queries, expected.reference_queries[:, :, 40 * groups :])
        torch.testing.assert_close(layer.keys, expected.keys[:, :, :40])


@torch.no_grad()
def test_repeat_reference_changes_the_fit_but_not_a_full_budget():
    model = build("llama")
    context, continuation = token_ids(2, 40), token_ids(2, 6, seed=1)
    reference = model(torch.cat([context, continuation], dim=1)).logits[:, 40:]
    with compaction(model, "attention_matching", budget=1.0, reference="repeat") as cache:
        model(context)
    torch.testing.assert_close(cache_logits(model, cache, continuation), reference, atol=1e-5, rtol=1e-5)
    compacted = {}
    for option in ("context", "repeat"):
        with compaction(model, "attention_matching", budget=0.25, reference=option) as cache:
            model(context)
        assert cache.get_seq_length() <= 10 and cache.seen_tokens == 40
        compacted[option] = cache_logits(model, cache, continuation)
    assert not torch.allclose(compacted["context"], compacted["repeat"], atol=1e-4)


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="reference"):
        get_method("attention_matching", reference="self_study")
