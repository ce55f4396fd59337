"""Every registered model family, on its tiny random model: Meta-KV, cached decoding, merging, LoRA."""

import pytest
import torch
from transformers import DynamicCache, OPTConfig

from metakv_cl.modeling import MetaKVConfig, add_meta_kv, merge_meta_kv
from metakv_cl.modeling.adapters import NormedK
from metakv_cl.modeling.families import FAMILIES, model_family
from metakv_cl.strategies.plugins.lora import make_lora_config
from metakv_cl.testing import left_padded_batch, randomize_meta_kv, stepwise_logits, tiny_model
from metakv_cl.transformers_api import with_cache

MODEL_TYPES = sorted(FAMILIES)
NORMED_K_TYPES = [name for name in MODEL_TYPES if isinstance(FAMILIES[name].adapter, NormedK)]


def meta_kv_model(model_type: str, source: str):
    torch.manual_seed(0)
    return add_meta_kv(tiny_model(model_type), MetaKVConfig(source=source, rank=4, state_dim=16))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fresh_meta_kv_equals_the_base_model(model_type):
    torch.manual_seed(0)
    model = tiny_model(model_type)
    ids, mask, positions = left_padded_batch()
    reference = model(ids, attention_mask=mask, position_ids=positions).logits
    add_meta_kv(model, MetaKVConfig(source="hybrid", rank=4, state_dim=16))
    assert (model(ids, attention_mask=mask, position_ids=positions).logits - reference).abs().max().item() <= 1e-6
    randomize_meta_kv(model)
    assert (model(ids, attention_mask=mask, position_ids=positions).logits - reference).abs().max().item() > 1e-2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cached_decoding_equals_a_full_forward(model_type):
    model = meta_kv_model(model_type, "attentive")
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    step = stepwise_logits(model, ids, mask, positions, prefill=3)
    assert ((full - step).abs() * mask[..., None]).max().item() <= 1e-4


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merging_computes_the_same_or_is_refused_where_k_is_normalised(model_type):
    model = meta_kv_model(model_type, "consolidated")
    randomize_meta_kv(model)
    ids, _, _ = left_padded_batch()
    unmerged = model(ids).logits
    if model_type in NORMED_K_TYPES:
        with pytest.raises(ValueError, match="normalises K after k_proj"):
            merge_meta_kv(model)
        assert torch.equal(model(ids).logits, unmerged)  # nothing was folded in before the refusal
    else:
        assert (merge_meta_kv(model)(ids).logits - unmerged).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type", NORMED_K_TYPES)
def test_k_modulation_is_added_after_the_k_norm(model_type):
    """A K norm that erases its input leaves only the modulation: it reaches the cache if added after it."""
    torch.manual_seed(0)
    model = tiny_model(model_type)
    for module in model.modules():
        if hasattr(module, "k_norm"):  # registered before Meta-KV's hooks, so it runs first
            module.k_norm.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    add_meta_kv(model, MetaKVConfig(source="consolidated", rank=4, state_dim=16))
    randomize_meta_kv(model)
    cache = DynamicCache(config=model.config)
    model(left_padded_batch()[0], **with_cache(model, cache), use_cache=True)
    assert all(layer.keys.abs().amax().item() > 1e-3 for layer in cache.layers)


def test_tiny_gemma3_has_a_sliding_window_shorter_than_the_test_sequence():
    config = tiny_model("gemma3_text").config
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    assert config.sliding_window < left_padded_batch()[0].shape[1]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_registered_facts_agree_with_the_tiny_model(model_type):
    family, model = FAMILIES[model_type], tiny_model(model_type)
    names = [name for name, _ in model.named_modules()]
    assert family.rope == any("rotary" in name for name in names)
    for target in family.lora_targets:
        assert sum(name.endswith(f".{target}") for name in names) == model.config.num_hidden_layers
    config = make_lora_config(model, rank=2, alpha=4)
    assert set(config.target_modules) == set(family.lora_targets) and config.fan_in_fan_out == family.conv1d


def test_unknown_model_types_are_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model type 'opt'; metakv-cl supports the model types gemma3_text, gpt2, "):
        model_family(OPTConfig())
