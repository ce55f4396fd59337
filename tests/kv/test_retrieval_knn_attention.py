"""kNN attention memory (Memorizing Transformers) behind the Cache API: exactness at full recall, gate, generate()."""

import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the 'retrieval' extra)")

from kv_helpers import build, token_ids, with_meta_kv  # noqa: E402
from metakv_cl.kv import CompactedCache, chunked_prefill, enable_compacted_attention, generate  # noqa: E402
from metakv_cl.kv.retrieval.knn_attention import KNNMemoryCache, departed_indices  # noqa: E402
from metakv_cl.transformers_api import with_cache  # noqa: E402

GREEDY = {"do_sample": False, "pad_token_id": 0}


def chunked_logits(model, cache, ids: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Logits of every token, read ``chunk`` tokens per forward call through ``cache``."""
    enable_compacted_attention(model)
    outputs = []
    with torch.no_grad():
        for part in ids.split(chunk, dim=1):
            positions = cache.position_ids(part.shape[1], part.shape[0])
            outputs.append(model(input_ids=part, position_ids=positions, use_cache=True, **with_cache(model, cache)).logits)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("meta_kv", [False, True], ids=["plain", "meta_kv"])
@pytest.mark.parametrize("method", ["sliding_window", "sinks_window", "h2o"])
def test_full_recall_in_one_softmax_is_the_full_cache(architecture, method, meta_kv):
    model = build(architecture)
    if meta_kv:
        with_meta_kv(model)
    ids = token_ids(2, 60)
    with torch.no_grad():
        full = model(ids).logits
    cache = KNNMemoryCache(method, 16, config=model.config, top_k=None, position_policy="seen")
    logits = chunked_logits(model, cache, ids)
    assert cache.stats()["memory_entries"] >= 40  # most of the input was evicted and came back from memory
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


def test_partial_recall_and_no_memory_differ_from_the_full_cache(architecture):
    model = build(architecture)
    ids = token_ids(1, 60)
    with torch.no_grad():
        full = model(ids).logits
    recall = chunked_logits(model, KNNMemoryCache("sliding_window", 16, config=model.config, top_k=4, position_policy="seen"), ids)
    window = chunked_logits(model, CompactedCache("sliding_window", 16, config=model.config, position_policy="seen"), ids)
    late = slice(24, None)  # once the window has evicted tokens
    assert (recall[:, late] - full[:, late]).abs().max() > 1e-3
    assert (recall[:, late] - full[:, late]).abs().mean() < (window[:, late] - full[:, late]).abs().mean()


def test_a_gate_of_one_is_the_local_cache_alone(architecture):
    model = build(architecture)
    ids = token_ids(2, 48)
    local = chunked_logits(model, CompactedCache("sliding_window", 16, config=model.config), ids)
    gated = KNNMemoryCache("sliding_window", 16, config=model.config, combine="gate", gate=torch.ones(4), top_k=8)
    torch.testing.assert_close(chunked_logits(model, gated, ids), local, atol=1e-5, rtol=1e-5)
    half = chunked_logits(model, KNNMemoryCache("sliding_window", 16, config=model.config, combine="gate", gate=0.5), ids)
    assert (half - local).abs().max() > 1e-3


def test_a_learned_gate_gets_a_gradient():
    model = build("llama")
    gate_logits = torch.zeros(4, requires_grad=True)
    cache = KNNMemoryCache("sliding_window", 16, config=model.config, combine="gate", gate=torch.sigmoid(gate_logits))
    enable_compacted_attention(model)
    ids = token_ids(1, 40)
    for part in ids.split(8, dim=1):
        logits = model(input_ids=part, position_ids=cache.position_ids(part.shape[1]), **with_cache(model, cache)).logits
    logits.sum().backward()
    assert gate_logits.grad is not None and bool(gate_logits.grad.abs().sum() > 0)


def test_only_the_chosen_layers_keep_a_memory():
    model = build("gpt2")
    cache = KNNMemoryCache("sliding_window", 16, config=model.config, memory_layers=[1])
    chunked_prefill(model, cache, token_ids(1, 48), chunk_size=8)
    assert [layer.memory_size for layer in cache.layers][0] == 0 and cache.layers[1].memory_size > 0


@pytest.mark.parametrize("memory_index", ["flat", "hnsw"])
def test_generation_at_full_recall_is_stock_generation(architecture, memory_index):
    model = build(architecture)
    context, prompt = token_ids(2, 40), token_ids(2, 4, seed=1)
    stock = model.generate(torch.cat([context, prompt], dim=1), max_new_tokens=8, **GREEDY)[:, 40:]
    cache = KNNMemoryCache("sliding_window", 16, config=model.config, top_k=None, memory_index=memory_index, position_policy="seen")
    chunked_prefill(model, cache, context, chunk_size=8)
    assert torch.equal(generate(model, cache, prompt, max_new_tokens=8, **GREEDY), stock)


def test_sampling_several_sequences_expands_the_memory():
    model = build("llama")
    cache = KNNMemoryCache("sliding_window", 16, config=model.config, top_k=4)
    chunked_prefill(model, cache, token_ids(2, 40), chunk_size=8)
    output = generate(model, cache, token_ids(2, 3, seed=1), max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=0)
    assert output.shape == (4, 7)
    assert cache.layers[0].memory_keys.shape[0] == 4 and len(cache.layers[0].stores) == 4 * 2


def test_merge_methods_send_every_replaced_entry_to_memory():
    model = build("gpt2")
    cache = KNNMemoryCache("moving_average", 16, config=model.config)
    chunked_prefill(model, cache, token_ids(1, 40), chunk_size=8)
    assert cache.layers[0].memory_size > 0 and cache.stats()["memory_bytes"] > 0


def test_departed_indices_are_the_complement_of_the_kept_ones():
    kept = torch.tensor([[[0, 3, 4]], [[1, 2, 5]]])
    assert departed_indices(kept, 6, kept).tolist() == [[[1, 2, 5]], [[0, 3, 4]]]
    assert departed_indices(None, 3, kept).tolist() == [[[0, 1, 2]], [[0, 1, 2]]]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="needs a method that evicts; FullCache"):
        KNNMemoryCache("full")
    with pytest.raises(ValueError, match="top_k must be a positive integer or None.*got 0"):
        KNNMemoryCache("sliding_window", 16, top_k=0)
    with pytest.raises(ValueError, match="unknown combine 'sum'"):
        KNNMemoryCache("sliding_window", 16, combine="sum")
    with pytest.raises(ValueError, match=r"gate must be .* in \[0, 1\], got 1.5"):
        KNNMemoryCache("sliding_window", 16, gate=1.5)
    with pytest.raises(ValueError, match="memory_index must be one of flat, hnsw, got 'ivf'"):
        KNNMemoryCache("sliding_window", 16, memory_index="ivf")
    with pytest.raises(ValueError, match="memory_layers must be non-negative"):
        KNNMemoryCache("sliding_window", 16, memory_layers=[-1])
    model = build("gpt2")
    cache = KNNMemoryCache("sliding_window", 16, config=model.config, combine="gate", gate=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="gate has 3 values, the model has 4 attention heads"):
        chunked_prefill(model, cache, token_ids(1, 40), chunk_size=8)


@pytest.mark.parametrize("method", [None, "h2o", "tova"])
def test_one_shot_compaction_keeps_what_it_drops_in_the_memory(architecture, method):
    """``cache.compact(budget)`` with the cache's method or any other: the memory gets every departure."""
    model = build(architecture)
    ids = token_ids(2, 40)
    with torch.no_grad():
        full = model(ids).logits
    cache = KNNMemoryCache("sinks_window", None, config=model.config, top_k=None, position_policy="seen")
    chunked_logits(model, cache, ids[:, :32])
    cache.compact(0.25, method=method)
    assert cache.stats()["memory_entries"] >= 24
    logits = chunked_logits(model, cache, ids[:, 32:])
    torch.testing.assert_close(logits, full[:, 32:], atol=1e-4, rtol=1e-4)
