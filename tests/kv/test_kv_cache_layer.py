"""CompactedCache as a transformers cache: the layer protocol, quantized storage, crop, sliding layers, plain generate."""

import logging

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from kv_helpers import build, token_ids
from metakv_cl.kv import CompactedCache, CompactedLayer, KVStorage, chunked_prefill, generate
from metakv_cl.testing import tiny_model
from metakv_cl.transformers_api import with_cache

GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.fixture(autouse=True)
def quiet_generate():
    """generate() warns about the tiny models' shared pad and eos token; the tests pass masks where it matters."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def held_tensor_bytes(layer) -> int:
    """Bytes of every tensor a layer keeps as an attribute, directly or in a storage (whatever it is called)."""
    total = 0
    for value in vars(layer).values():
        tensors = value.tensors() if isinstance(value, KVStorage) else [value] if isinstance(value, torch.Tensor) else []
        total += sum(t.untyped_storage().nbytes() for t in tensors)
    return total


def test_the_layer_is_a_cache_layer_whose_base_initializer_ran(monkeypatch):
    initialized = []
    original = CacheLayerMixin.__init__

    def spy(self, **kwargs):
        initialized.append(type(self))
        original(self, **kwargs)

    monkeypatch.setattr(CacheLayerMixin, "__init__", spy)
    model = build("llama")
    cache = CompactedCache("h2o", 16, model=model)
    assert initialized == [CompactedLayer] * model.config.num_hidden_layers
    layer = cache.layers[0]
    assert isinstance(layer, CacheLayerMixin) and layer.keys is None and not layer.is_initialized
    model(token_ids(2, 10), **with_cache(model, cache), use_cache=True)
    # keys and values are the layer's own tensors, as for every transformers layer
    assert isinstance(vars(layer)["keys"], torch.Tensor) and layer.keys.shape == (2, 2, 10, 16)


@torch.no_grad()
def test_a_quantized_layer_keeps_no_float_copy_of_its_quantized_entries():
    model = build("llama")
    cache = CompactedCache("int4", 48, model=model, group_size=8, residual=8)
    chunked_prefill(model, cache, token_ids(2, 160), chunk_size=8)
    model(token_ids(2, 1, seed=1), **with_cache(model, cache), use_cache=True)  # a decoding step after the prefill
    for layer in cache.compacted_layers:
        assert layer.quantized_keys.is_quantized and layer.keys.shape[-2] < 24  # the residual: a partial group + 8
        full_precision = layer.get_seq_length() * layer.full_token_bytes
        assert held_tensor_bytes(layer) == layer.nbytes  # the counted bytes are all the bytes held
        assert layer.nbytes < 0.45 * full_precision  # 4-bit codes and scales of float32 entries, plus the residual
        keys, values = layer.dequantized()
        assert keys.shape[-2] == values.shape[-2] == layer.get_seq_length()


@torch.no_grad()
@pytest.mark.parametrize("tokens_to_remove", [-3, 0, -10, -11, 4, 10, 30])
def test_crop_means_what_it_means_to_transformers(tokens_to_remove):
    """Negative: remove that many; zero: nothing; positive: whatever the installed transformers makes of it."""
    model = build("llama")
    context = token_ids(2, 10)
    stock = DynamicCache(config=model.config)
    model(context, **with_cache(model, stock), use_cache=True)
    cache = CompactedCache("full", model=model)
    model(context, **with_cache(model, cache), use_cache=True)
    try:
        stock.crop(tokens_to_remove)
    except ValueError:
        with pytest.raises(ValueError):
            cache.crop(tokens_to_remove)
        return
    cache.crop(tokens_to_remove)
    assert cache.get_seq_length() == stock.get_seq_length()
    for layer, expected in zip(cache.layers, stock.layers):
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)
        assert layer.nbytes == expected.keys.nbytes + expected.values.nbytes  # no slice keeps cropped bytes alive


@torch.no_grad()
def test_crop_refuses_entries_a_compaction_produced():
    model = build("llama")
    cache = CompactedCache("h2o", 16, model=model, headroom=0.25)
    chunked_prefill(model, cache, token_ids(1, 40), chunk_size=8)
    layer = cache.layers[0]
    assert layer.compactions > 0
    appended = layer.appended_since_compaction
    with pytest.raises(ValueError, match=f"only the {appended} appended since its last compaction"):
        cache.crop(-(appended + 1))
    cache.crop(-appended)
    assert layer.appended_since_compaction == 0


@torch.no_grad()
def test_sliding_window_layers_are_left_to_transformers():
    model = tiny_model("gemma3_text")  # layer 0 slides over 4 tokens, layer 1 attends to everything
    torch.manual_seed(0)
    prompt = token_ids(2, 12)
    stock = model.generate(prompt, max_new_tokens=12, **GREEDY)
    roomy = CompactedCache("h2o", 500, model=model)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, **with_cache(model, roomy), **GREEDY), stock)
    cache = CompactedCache("h2o", 8, model=model)
    model.generate(prompt, max_new_tokens=12, **with_cache(model, cache), **GREEDY)
    window, full = cache.layers
    assert type(window) is DynamicSlidingWindowLayer and window.keys.shape[-2] == 3  # the window minus one
    assert isinstance(full, CompactedLayer) and full.compactions > 0 and full.get_seq_length() <= 8
    assert cache.compacted_layers == [full]
    assert cache.nbytes == full.nbytes + window.keys.nbytes + window.values.nbytes


@torch.no_grad()
def test_probing_gives_a_sliding_window_back_its_state():
    model = tiny_model("gemma3_text")
    cache = CompactedCache("attention_matching", 32, model=model)
    model(token_ids(1, 10), **with_cache(model, cache), use_cache=True)
    window = cache.layers[0]
    keys, length = window.keys, window.get_seq_length()
    with cache.probing():
        model(token_ids(1, 6, seed=1), **with_cache(model, cache), use_cache=True)
    assert window.keys is keys and window.get_seq_length() == length and cache.layers[1].get_seq_length() == 10


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_plain_generate_with_a_roomy_cache_is_stock_generate(architecture, padded):
    model = build(architecture)
    prompt, mask = token_ids(2, 9), torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
        prompt = prompt.masked_fill(mask == 0, 0)
    stock = model.generate(prompt, attention_mask=mask, max_new_tokens=10, **GREEDY)
    cache = CompactedCache("h2o", 500, model=model)
    output = model.generate(prompt, attention_mask=mask, max_new_tokens=10, **with_cache(model, cache), **GREEDY)
    assert torch.equal(output, stock)
    assert cache.stats()["compactions"] == 0 and cache.seen_tokens == 18


@torch.no_grad()
def test_plain_generate_runs_gpt2_past_its_position_table():
    model = build("gpt2")  # 128 learned positions
    cache = CompactedCache("h2o", 32, model=model)
    output = model.generate(token_ids(2, 20), max_new_tokens=150, min_new_tokens=150, **with_cache(model, cache), **GREEDY)
    assert output.shape == (2, 170) and cache.seen_tokens == 169
    assert cache.held_entries() <= 32 and cache.stats()["compactions"] > 0


@torch.no_grad()
@pytest.mark.parametrize("method", ["h2o", "int4"])
def test_plain_generate_decodes_like_the_generate_helper(architecture, method):
    """Positions from the cache itself equal the explicit ones of metakv_cl.kv.generate, compaction included."""
    prompt = token_ids(2, 24)
    options = {"group_size": 8, "residual": 8} if method == "int4" else {}
    helper_model = build(architecture)
    helper_cache = CompactedCache(method, 16, config=helper_model.config, **options)
    expected = generate(helper_model, helper_cache, prompt, max_new_tokens=30, **GREEDY)
    model = build(architecture)
    cache = CompactedCache(method, 16, model=model, **options)
    output = model.generate(prompt, max_new_tokens=30, **with_cache(model, cache), **GREEDY)
    assert cache.stats()["compactions"] > 0
    assert torch.equal(output, expected)


@torch.no_grad()
def test_plain_generate_continues_a_prefilled_cache(architecture):
    """transformers' contract: the ids passed include the cached ones, which generate skips."""
    model = build(architecture)
    ids = torch.cat([token_ids(2, 40), token_ids(2, 5, seed=1)], dim=1)
    stock = model.generate(ids, max_new_tokens=8, **GREEDY)
    cache = CompactedCache("full", model=model)
    chunked_prefill(model, cache, ids[:, :40], chunk_size=16)
    assert torch.equal(model.generate(ids, max_new_tokens=8, **with_cache(model, cache), **GREEDY), stock)


def test_a_cache_without_its_model_says_how_to_make_one():
    model = build("llama")
    cache = CompactedCache("h2o", 16, config=model.config)
    with pytest.raises(RuntimeError, match=r"CompactedCache\(method, max_tokens, model=model\)"):
        model.generate(token_ids(1, 6), max_new_tokens=3, **with_cache(model, cache), **GREEDY)
    with pytest.raises(ValueError, match="model= or config=, not both"):
        CompactedCache("h2o", 16, model=model, config=model.config)


@torch.no_grad()
def test_a_knn_memory_cache_builds_its_own_layers_and_generates():
    from metakv_cl.kv.retrieval.knn_attention import KNNMemoryCache, KNNMemoryLayer

    model = build("llama")
    cache = KNNMemoryCache("h2o", 16, model=model, top_k=4)
    assert all(type(layer) is KNNMemoryLayer for layer in cache.layers)
    model.generate(token_ids(1, 12), max_new_tokens=20, min_new_tokens=20, **with_cache(model, cache), **GREEDY)
    assert cache.stats()["compactions"] > 0 and cache.stats()["memory_entries"] > 0
