"""The cache argument under both of its transformers names, and loud failure under any other."""

import inspect
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from metakv_cl.modeling import MetaKVConfig, add_meta_kv
from metakv_cl.testing import left_padded_batch, randomize_meta_kv, tiny_gpt2, tiny_llama
from metakv_cl.transformers_api import cache_argument_name, output_cache, passed_cache, with_cache

RENAMED = Version(transformers.__version__) >= Version("5.24")


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_the_cache_name_is_the_installed_release_s(build):
    model = build()
    expected = "cache" if RENAMED else "past_key_values"
    assert cache_argument_name(model.forward) == expected
    assert list(with_cache(model, None)) == [expected]
    output = model(torch.ones(1, 3, dtype=torch.long), **with_cache(model, DynamicCache(config=model.config)), use_cache=True)
    assert isinstance(output_cache(output), DynamicCache) and output_cache(output).get_seq_length() == 3


def _new(hidden_states, cache=None, **kwargs): ...


def _old(hidden_states, past_key_values=None, **kwargs): ...


@pytest.mark.parametrize("function", [_new, _old])
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_passed_cache_reads_both_names_by_keyword_and_position(function, keyword):
    cache, signature = DynamicCache(), inspect.signature(function)
    assert passed_cache(signature, (torch.zeros(1),), {keyword: cache}) is cache
    assert passed_cache(signature, (torch.zeros(1), cache), {}) is cache
    assert passed_cache(signature, (torch.zeros(1),), {"attention_mask": None}) is None


def test_a_cache_under_an_unknown_name_is_refused():
    with pytest.raises(TypeError, match="arrived as kv_state, not as cache or past_key_values"):
        passed_cache(inspect.signature(_new), (torch.zeros(1),), {"kv_state": DynamicCache()})


def test_a_function_without_a_cache_argument_is_refused():
    def forward(hidden_states, attention_mask=None): ...

    with pytest.raises(TypeError, match="takes no cache argument"):
        cache_argument_name(forward)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_meta_kv_attention_refuses_a_cache_it_cannot_see(build):
    model = build()
    add_meta_kv(model, MetaKVConfig(source="mean", rank=4, state_dim=16))
    attention = model.meta_kv.sites[0].attention
    with pytest.raises(TypeError, match="arrived as kv_state"):
        attention(torch.zeros(1, 2, model.config.hidden_size), kv_state=DynamicCache(config=model.config))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_the_legacy_keyword_decodes_like_the_current_one(build):
    """Callers that still pass ``past_key_values`` keep the dynamic meta-state on every release."""
    model = build()
    add_meta_kv(model, MetaKVConfig(source="recurrent", rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice of the old keyword
        model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)
        last = model(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], past_key_values=cache, use_cache=True)
    assert (last.logits[:, -1] - full[:, -1]).abs().max().item() <= 1e-4
