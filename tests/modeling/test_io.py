"""Saving and loading Meta-KV models."""

import pytest
import torch

from metakv_cl.modeling import (
    MetaKVConfig,
    MetaKVModel,
    add_meta_kv,
    get_meta_kv,
    load_meta_kv,
    load_meta_kv_model,
    merge_meta_kv,
    meta_kv_parameters,
    save_meta_kv,
)
from metakv_cl.testing import VOCAB, tiny_gpt2, tiny_llama


def randomized(model, config):
    add_meta_kv(model, config)
    with torch.no_grad():
        for parameter in meta_kv_parameters(model):
            parameter.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("config", [
    MetaKVConfig(source="hybrid", hybrid_dynamic="recurrent", form="hypernetwork", rank=4),
    MetaKVConfig(source="addressed", addressed_summary="attentive", memory_slots=6, rank=4),
], ids=["hybrid", "addressed"])
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_save_pretrained_round_trip(tmp_path, factory, config):
    torch.manual_seed(0)
    model = randomized(factory(), config)
    ids = torch.randint(0, VOCAB, (2, 10))
    expected = model(ids).logits
    MetaKVModel(model).save_pretrained(tmp_path / "saved", save_base_model=True)
    loaded = load_meta_kv_model(tmp_path / "saved")
    assert get_meta_kv(loaded).config == config
    assert (loaded(ids).logits - expected).abs().max().item() == 0.0


def test_saved_base_weights_have_no_meta_kv_keys_and_are_unmerged(tmp_path):
    from safetensors.torch import load_file

    model = randomized(tiny_gpt2(), MetaKVConfig(source="consolidated"))
    original = model.transformer.h[0].attn.c_attn.weight.clone()
    merge_meta_kv(model)
    MetaKVModel(model).save_pretrained(tmp_path, save_base_model=True)
    base = load_file(str(tmp_path / "model.safetensors"))
    assert not any(key.startswith("meta_kv.") for key in base)
    torch.testing.assert_close(base["transformer.h.0.attn.c_attn.weight"], original)
    assert get_meta_kv(model).merged  # still merged in memory


def test_load_meta_kv_into_a_fresh_base_model(tmp_path):
    torch.manual_seed(0)
    model = randomized(tiny_llama(), MetaKVConfig(source="attentive"))
    save_meta_kv(model, tmp_path)
    torch.manual_seed(0)
    fresh = load_meta_kv(tiny_llama(), tmp_path)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert (fresh(ids).logits - model(ids).logits).abs().max().item() == 0.0


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta_kv_config.json is missing"):
        load_meta_kv(tiny_gpt2(), tmp_path)
    save_meta_kv(randomized(tiny_gpt2(), MetaKVConfig(source="mean")), tmp_path)
    with pytest.raises(ValueError, match="differs from the model's"):
        load_meta_kv(add_meta_kv(tiny_gpt2(), MetaKVConfig(source="max")), tmp_path)


def test_saved_config_records_checksum_and_base_model_and_old_layout_loads_with_a_warning(tmp_path):
    import hashlib
    import json

    torch.manual_seed(0)
    model = randomized(tiny_gpt2(), MetaKVConfig(source="mean", rank=4))
    save_meta_kv(model, tmp_path)
    record = json.loads((tmp_path / "meta_kv_config.json").read_text())
    assert record["base_model"] == {"model_type": "gpt2", "architecture": "GPT2LMHeadModel", "name_or_path": None}
    assert record["weights_sha256"] == hashlib.sha256((tmp_path / "meta_kv.safetensors").read_bytes()).hexdigest()
    # a directory saved before the checksum existed holds the bare config
    (tmp_path / "meta_kv_config.json").write_text(json.dumps(record["meta_kv"]))
    torch.manual_seed(0)  # the same base weights
    with pytest.warns(UserWarning, match="records no weights checksum"):
        loaded = load_meta_kv(tiny_gpt2(), tmp_path)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert (loaded(ids).logits - model(ids).logits).abs().max().item() == 0.0
