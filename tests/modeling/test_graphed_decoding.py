"""GraphedDecoder: the static-buffer decoding step decodes exactly what model.generate decodes.

On CPU the step runs eagerly (no CUDA graph), which checks everything the graph replays: the
StaticCache, the Meta-KV state it keeps in place, the additive mask and the self-advancing buffers.
"""

import os

import pytest
import torch

from metakv_cl.modeling import DYNAMIC_SOURCES, MetaKVConfig, add_meta_kv
from metakv_cl.modeling.graphed_decoding import GraphedDecoder
from metakv_cl.modeling.meta_kv import MetaKVLayer
from metakv_cl.testing import left_padded_batch, randomize_meta_kv, tiny_gpt2

NEW_TOKENS = 6


def reference_tokens(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def meta_kv_model(factory, source, form="factorized"):
    model = factory()
    add_meta_kv(model, MetaKVConfig(source=source, form=form, rank=4, state_dim=16))
    randomize_meta_kv(model)
    return model


@pytest.mark.parametrize("source", [None, *DYNAMIC_SOURCES, "hybrid", "consolidated"])
def test_graphed_decoder_equals_generate(tiny_model_factory, source):
    model = tiny_model_factory() if source is None else meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(length=8)
    decoder = GraphedDecoder(model, batch_size=3, max_cache_len=32)
    assert torch.equal(decoder.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS), reference_tokens(model, ids, mask))


def test_decoder_is_reusable_and_keeps_the_state_in_place(tiny_model_factory):
    model = meta_kv_model(tiny_model_factory, "mean", form="hypernetwork")
    decoder = GraphedDecoder(model, batch_size=3, max_cache_len=32)
    first_ids, first_mask, _ = left_padded_batch(length=8, seed=1)
    decoder.generate(first_ids, attention_mask=first_mask, max_new_tokens=NEW_TOKENS)
    state = decoder.cache.meta_kv_states.states
    addresses = {layer: [t.data_ptr() for t in tensors] for layer, tensors in state.items()}
    ids, mask, _ = left_padded_batch(length=10, seed=2)  # a longer prompt on the same buffers
    assert torch.equal(decoder.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS), reference_tokens(model, ids, mask))
    state = decoder.cache.meta_kv_states.states
    assert {layer: [t.data_ptr() for t in tensors] for layer, tensors in state.items()} == addresses


def test_running_state_given_as_broadcast_views_is_kept_in_dense_buffers(tiny_model_factory, monkeypatch):
    """A compiled layer may return its state as broadcast views of one row (identical rows here);
    the static cache's buffers must still take in-place updates, and a second prefill's copy."""
    model = meta_kv_model(tiny_model_factory, "mean")
    original_forward = MetaKVLayer.forward

    def broadcast_state(layer, x, real, state, memory_state, documents=None):
        delta, new_state = original_forward(layer, x, real, state, memory_state, documents)
        return delta, tuple(t[:1].expand_as(t) for t in new_state)

    monkeypatch.setattr(MetaKVLayer, "forward", broadcast_state)
    ids = left_padded_batch(length=8)[0][:1].repeat(3, 1)  # one prompt three times, no padding
    decoder = GraphedDecoder(model, batch_size=3, max_cache_len=32)
    for _ in range(2):
        assert torch.equal(decoder.generate(ids, max_new_tokens=NEW_TOKENS), reference_tokens(model, ids, torch.ones_like(ids)))


def test_sampling_is_seeded_and_near_zero_temperature_is_greedy():
    model = meta_kv_model(tiny_gpt2, "attentive")
    ids, mask, _ = left_padded_batch(length=8)
    greedy = GraphedDecoder(model, batch_size=3, max_cache_len=32).generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    decoder = GraphedDecoder(model, batch_size=3, max_cache_len=32)
    assert torch.equal(decoder.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, temperature=1e-4), greedy)
    samples = []
    for _ in range(2):
        torch.manual_seed(0)
        samples.append(decoder.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, temperature=5.0))
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0], greedy)  # at temperature 5 the tiny model's argmax rarely wins 18 times


def test_tokens_after_eos_become_padding():
    model = tiny_gpt2()
    ids, mask, _ = left_padded_batch(length=8)
    tokens = GraphedDecoder(model, batch_size=3, max_cache_len=32).generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    eos = int(tokens[0, 1])
    trimmed = GraphedDecoder(model, batch_size=3, max_cache_len=32).generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=-1
    )
    first_eos = (tokens == eos).long().argmax(dim=1)
    for row in range(3):
        hit = bool((tokens[row] == eos).any())
        end = int(first_eos[row]) + 1 if hit else NEW_TOKENS
        assert torch.equal(trimmed[row, :end], tokens[row, :end])
        assert (trimmed[row, end:] == -1).all()


def test_bad_arguments_are_named():
    model = tiny_gpt2()
    ids, mask, _ = left_padded_batch(length=8)
    decoder = GraphedDecoder(model, batch_size=3, max_cache_len=16)
    with pytest.raises(ValueError, match="batch 3"):
        decoder.generate(ids[:2], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceed max_cache_len 16"):
        decoder.generate(ids, attention_mask=mask, max_new_tokens=9)
    with pytest.raises(ValueError, match="positions"):
        GraphedDecoder(model, batch_size=1, max_cache_len=1000)
    with pytest.raises(ValueError, match="eval mode"):
        GraphedDecoder(tiny_gpt2().train(), batch_size=1, max_cache_len=16)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedDecoder(model, batch_size=1, max_cache_len=16, cuda_graph=True)
    with pytest.raises(ValueError, match="needs a model with Meta-KV"):
        GraphedDecoder(model, batch_size=1, max_cache_len=16, fused_meta_kv=True)
    if "TRITON_INTERPRET" not in os.environ:
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            GraphedDecoder(meta_kv_model(tiny_gpt2, "mean"), batch_size=1, max_cache_len=16, fused_meta_kv=True)


def test_sliding_window_layers_shorter_than_the_cache_are_refused_and_within_it_decode_exactly():
    from metakv_cl.testing import tiny_model

    torch.manual_seed(0)
    model = tiny_model("gemma3_text").eval()  # sliding window 4 on its first layer
    with pytest.raises(ValueError, match="sliding-window layers hold 4; use max_cache_len <= 4"):
        GraphedDecoder(model, batch_size=1, max_cache_len=32)
    ids = torch.randint(1, 90, (1, 2))
    reference = model.generate(ids, max_new_tokens=2, do_sample=False)[:, 2:]
    assert torch.equal(GraphedDecoder(model, batch_size=1, max_cache_len=4).generate(ids, max_new_tokens=2), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("source", [None, "mean", "attentive", "max", "recurrent", "consolidated"])
def test_cuda_graph_replays_the_eager_step(tiny_model_factory, source, fused):
    if fused and source in (None, "recurrent"):
        pytest.skip("the fused kernel covers the factorized Meta-KV layers without a GRU")
    model = (tiny_model_factory() if source is None else meta_kv_model(tiny_model_factory, source)).cuda()
    eager = GraphedDecoder(model, batch_size=3, max_cache_len=40, cuda_graph=False)
    graphed = GraphedDecoder(model, batch_size=3, max_cache_len=40, cuda_graph=True, fused_meta_kv=fused)
    for length in (8, 12):  # the second call replays the captured graph only
        ids, mask, _ = left_padded_batch(length=length, seed=length)
        ids, mask = ids.cuda(), mask.cuda()
        expected = eager.generate(ids, attention_mask=mask, max_new_tokens=16)
        assert torch.equal(graphed.generate(ids, attention_mask=mask, max_new_tokens=16), expected)
    assert graphed.graph is not None
