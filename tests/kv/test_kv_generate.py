"""``generate()`` from compacted caches: every method, GPT-2 and Llama, batch > 1, with and without Meta-KV."""

import pytest
import torch
from transformers import DynamicCache

from kv_helpers import METHODS, build, token_ids, with_meta_kv
from metakv_cl.kv import CompactedCache, chunked_prefill, generate
from metakv_cl.transformers_api import with_cache

GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize("meta_kv", [False, True], ids=["plain", "meta_kv"])
@pytest.mark.parametrize("method", METHODS)
def test_generate_runs_with_every_method_at_batch_two(architecture, method, meta_kv):
    model = build(architecture)
    if meta_kv:
        with_meta_kv(model)
    cache = CompactedCache(method, None if method == "full" else 32, config=model.config, headroom=0.25, reference_queries=256)
    chunked_prefill(model, cache, token_ids(2, 64), chunk_size=16)
    prompt = token_ids(2, 5, seed=1)
    output = generate(model, cache, prompt, max_new_tokens=10, **GREEDY)
    assert output.shape == (2, 15)
    assert torch.equal(output[:, :5], prompt)
    assert int(output.max()) < model.config.vocab_size
    if method != "full":
        assert cache.stats()["compactions"] >= 2  # compaction also happened while decoding
        share = max(1.0, cache.method.layer_share(0, cache.layer_count(), 32 / cache.seen_tokens))  # PyramidKV: > 1
        assert cache.layers[0].peak_bytes <= 1.1 * (32 * share + 5) * cache.layers[0].full_token_bytes


@pytest.mark.parametrize("meta_kv", [False, True], ids=["plain", "meta_kv"])
def test_full_cache_generation_equals_stock_generation(architecture, meta_kv):
    """Through the wrapper and the compacted cache, decoding is token for token the stock one."""
    model = build(architecture)
    if meta_kv:
        with_meta_kv(model)
    context, prompt = token_ids(2, 30), token_ids(2, 4, seed=1)
    stock = model.generate(torch.cat([context, prompt], dim=1), max_new_tokens=8, **GREEDY)[:, 30:]
    cache = CompactedCache("full", config=model.config)
    chunked_prefill(model, cache, context, chunk_size=7)
    assert torch.equal(generate(model, cache, prompt, max_new_tokens=8, **GREEDY), stock)


def test_left_padded_prompts_decode_like_stock(architecture):
    model = build(architecture)
    prompt = token_ids(3, 9)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    mask[2, :5] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    stock = model.generate(prompt, attention_mask=mask, max_new_tokens=6, **with_cache(model, DynamicCache(config=model.config)), **GREEDY)
    cache = CompactedCache("sliding_window", 500, config=model.config)
    assert torch.equal(generate(model, cache, prompt, attention_mask=mask, max_new_tokens=6, **GREEDY), stock)


def test_sampling_several_sequences_per_prompt_expands_a_quantized_cache():
    model = build("llama")
    cache = CompactedCache("int4", 48, config=model.config, group_size=8, residual=8)
    chunked_prefill(model, cache, token_ids(2, 120), chunk_size=8)
    assert cache.layers[0].key_storage.is_quantized
    torch.manual_seed(0)
    output = generate(model, cache, token_ids(2, 3, seed=1), max_new_tokens=4, do_sample=True,
                      num_return_sequences=2, pad_token_id=0)
    assert output.shape == (4, 7)
    assert cache.layers[0].key_storage.segments[0].shape[0] == 4


def test_generate_checks_its_inputs():
    model = build("gpt2")
    cache = CompactedCache("h2o", 32, config=model.config)
    chunked_prefill(model, cache, token_ids(2, 40))
    with pytest.raises(ValueError, match="batch"):
        generate(model, cache, token_ids(3, 4), max_new_tokens=2, **GREEDY)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, cache, token_ids(2, 4), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, cache, torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2)
