"""The dynamic Meta-KV state travels with its cache: beam search, copies, row edits, crop, reset.

Every reference is a full forward (or ``generate(use_cache=False)``, which runs one full forward
per step), so a state left behind by a cache operation shows up as a difference.
"""

import copy
import pickle

import pytest
import torch
import transformers
from transformers import DynamicCache, StaticCache

from metakv_cl.modeling import DYNAMIC_SOURCES, MetaKVConfig, add_meta_kv
from metakv_cl.modeling.meta_kv import real_queries
from metakv_cl.transformers_api import output_cache, with_cache
from metakv_cl.testing import VOCAB, left_padded_batch, randomize_meta_kv

TOLERANCE = 1e-4


def meta_kv_model(factory, source):
    model = add_meta_kv(factory(), MetaKVConfig(source=source, rank=4, state_dim=16))
    randomize_meta_kv(model)
    return model


def full_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(ids, attention_mask=mask, position_ids=positions).logits


def continue_logits(model, cache, ids, mask, new_ids):
    """Logits of ``new_ids`` run on ``cache`` (which holds ``ids``), one chunk."""
    full_mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)[:, -new_ids.shape[1]:]
    return model(new_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                 **with_cache(model, cache)).logits


def prefill(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return output_cache(model(ids, attention_mask=mask, position_ids=positions, use_cache=True))


@pytest.mark.parametrize("source", DYNAMIC_SOURCES + ("addressed",))
def test_beam_search_equals_beam_search_on_full_forwards(tiny_model_factory, source):
    model = meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    settings = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                    output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **settings)
    reference = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached.sequences, reference.sequences)
    torch.testing.assert_close(cached.sequences_scores, reference.sequences_scores, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("source", ["mean", "attentive", "recurrent"])
def test_static_cache_generation_equals_full_forwards(tiny_model_factory, source, attn_implementation):
    """A static cache makes generate() pass a 4-D mask, whose padding rows must not enter the state."""
    model = meta_kv_model(lambda: tiny_model_factory(attn_implementation), source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(ids, cache_implementation="static", **settings)
    assert torch.equal(static, model.generate(ids, use_cache=False, **settings))


@torch.no_grad()  # the recipe is for inference: tensors that carry autograd history cannot be deep-copied
@pytest.mark.parametrize("source", DYNAMIC_SOURCES)
def test_a_copied_prompt_cache_continues_like_a_full_forward(tiny_model_factory, source):
    """transformers' prompt-reuse recipe: prefill once, deepcopy the cache per continuation."""
    model = meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    prompt_cache = prefill(model, ids, mask)
    for seed in (1, 2):
        new_ids = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(seed))
        logits = continue_logits(model, copy.deepcopy(prompt_cache), ids, mask, new_ids)
        reference = full_logits(model, torch.cat([ids, new_ids], 1), torch.cat([mask, torch.ones_like(new_ids)], 1))
        torch.testing.assert_close(logits, reference[:, -3:], atol=TOLERANCE, rtol=0)
    restored = pickle.loads(pickle.dumps(prompt_cache))
    assert type(restored) is type(prompt_cache) and isinstance(restored, DynamicCache)
    for layer, state in prompt_cache.meta_kv_states.states.items():
        assert all(torch.equal(a, b) for a, b in zip(state, restored.meta_kv_states.states[layer]))


@pytest.mark.parametrize("source", ["mean", "max", "recurrent"])
def test_repeated_and_selected_rows_carry_their_state(tiny_model_factory, source):
    model = meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(batch=3, length=8)
    cache = prefill(model, ids, mask)
    cache.batch_repeat_interleave(2)  # rows 0 0 1 1 2 2, as shared-prompt scoring does
    cache.batch_select_indices(torch.tensor([1, 2, 5]))  # rows 0 1 2
    rows = torch.tensor([0, 1, 2])
    new_ids = torch.randint(1, VOCAB, (3, 2), generator=torch.Generator().manual_seed(3))
    logits = continue_logits(model, cache, ids[rows], mask[rows], new_ids)
    reference = full_logits(model, torch.cat([ids, new_ids], 1), torch.cat([mask, torch.ones_like(new_ids)], 1))
    torch.testing.assert_close(logits, reference[:, -2:], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("source", ["mean", "attentive", "recurrent"])
def test_crop_returns_to_an_earlier_call_and_refuses_a_cut_inside_one(tiny_model_factory, source):
    model = meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    cache = prefill(model, ids, mask)
    first, rejected, second = (torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(n))
                               for n in (1, 3, 2))
    continue_logits(model, cache, ids, mask, first)
    seen = torch.cat([ids, first], 1), torch.cat([mask, torch.ones_like(first)], 1)
    continue_logits(model, cache, *seen, rejected)  # three candidate tokens in one call
    with pytest.raises(ValueError, match="cannot crop the cache to 10 tokens: a dynamic Meta-KV state is kept only"):
        cache.crop(-2)
    assert cache.get_seq_length() == 12  # a refused crop changes nothing
    if int(transformers.__version__.split(".")[1]) >= 18:  # a positive argument is refused there
        with pytest.raises(ValueError):
            cache.crop(4)
        assert cache.get_seq_length() == 12 and max(cache.meta_kv_states.lengths.values()) == 12
    cache.crop(-3)  # back to the end of the first token's call
    assert cache.get_seq_length() == 9
    logits = continue_logits(model, cache, *seen, second)
    reference = full_logits(model, torch.cat([seen[0], second], 1), torch.cat([seen[1], torch.ones_like(second)], 1))
    torch.testing.assert_close(logits, reference[:, -2:], atol=TOLERANCE, rtol=0)


def test_reset_starts_a_new_sequence_on_the_same_cache(tiny_model_factory):
    model = meta_kv_model(tiny_model_factory, "recurrent")
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    cache = StaticCache(config=model.config, max_cache_len=32)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **with_cache(model, cache))
    cache.reset()
    other = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    ones = torch.ones_like(other)
    logits = model(other, attention_mask=ones, use_cache=True, **with_cache(model, cache)).logits
    torch.testing.assert_close(logits, full_logits(model, other, ones), atol=TOLERANCE, rtol=0)


def test_a_cache_edited_behind_the_state_s_back_is_refused(tiny_model_factory):
    model = meta_kv_model(tiny_model_factory, "mean")
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    cache = prefill(model, ids, mask)
    for layer in cache.layers:  # rows dropped without the cache's own method
        layer.keys, layer.values = layer.keys[:1], layer.values[:1]
    with pytest.raises(RuntimeError, match="carries a Meta-KV state for 2 rows but the input has 1"):
        continue_logits(model, cache, ids[:1], mask[:1], ids[:1, :1])


def test_real_queries_reads_padding_from_4d_masks_of_either_kind():
    # row 0: two left pads, the first fully masked, the second unmasked everywhere (as
    # transformers does for SDPA); row 1: no padding; two cached slots before the three queries
    allowed = torch.zeros(2, 1, 3, 6, dtype=torch.bool)
    allowed[0, 0, 1] = True
    allowed[0, 0, 2, 4] = True
    allowed[1, 0] = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    expected = torch.tensor([[False, False, True], [True, True, True]])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive):
        assert torch.equal(real_queries(mask, past=2), expected)
    with pytest.raises(ValueError, match="6 key slots cannot cover 4 cached and 3 new tokens"):
        real_queries(allowed, past=4)
