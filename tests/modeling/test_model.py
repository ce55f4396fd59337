"""The peft-style model API: wrap, save, load (local and hub), merge and unload, switch off."""

import json

import pytest
import torch

from metakv_cl.modeling import (
    MetaKVConfig,
    MetaKVModel,
    freeze_base,
    get_meta_kv_model,
    has_meta_kv,
    load_meta_kv_model,
    meta_kv_parameters,
)
from metakv_cl.testing import VOCAB, randomize_meta_kv, tiny_gpt2, tiny_llama

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def base_and_wrapped(factory, config):
    torch.manual_seed(0)
    base_logits = factory()(IDS).logits
    torch.manual_seed(0)
    wrapped = get_meta_kv_model(factory(), config)
    randomize_meta_kv(wrapped)
    return base_logits, wrapped


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_wrapper_forwards_generates_and_reads_like_the_model(factory):
    _, wrapped = base_and_wrapped(factory, MetaKVConfig(source="mean", rank=4))
    model = wrapped.get_base_model()
    assert torch.equal(wrapped(IDS).logits, model(IDS).logits)
    assert torch.equal(wrapped.generate(IDS, max_new_tokens=4, do_sample=False),
                       model.generate(IDS, max_new_tokens=4, do_sample=False))
    assert wrapped.config is model.config and wrapped.meta_kv_config == MetaKVConfig(source="mean", rank=4)
    with pytest.raises(TypeError, match="already a MetaKVModel"):
        MetaKVModel(wrapped)
    with pytest.raises(ValueError, match="already has Meta-KV"):
        MetaKVModel(model, MetaKVConfig(source="max"))


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_adapter_only_save_loads_onto_a_fresh_base_model(tmp_path, factory):
    _, wrapped = base_and_wrapped(factory, MetaKVConfig(source="hybrid", hybrid_dynamic="attentive", rank=4))
    expected = wrapped(IDS).logits
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_kv.safetensors", "meta_kv_config.json"]
    torch.manual_seed(0)
    loaded = MetaKVModel.from_pretrained(factory(), tmp_path)
    assert isinstance(loaded, MetaKVModel) and torch.equal(loaded(IDS).logits, expected)


def test_load_finds_the_base_model_by_its_recorded_name(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")  # what from_pretrained(folder) records
    wrapped = get_meta_kv_model(base, MetaKVConfig(source="recurrent", rank=4))
    randomize_meta_kv(wrapped)
    expected = wrapped(IDS).logits
    wrapped.save_pretrained(tmp_path / "meta_kv")
    loaded = load_meta_kv_model(tmp_path / "meta_kv")
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-6)
    nameless = tmp_path / "nameless"
    get_meta_kv_model(tiny_gpt2(), MetaKVConfig(source="mean")).save_pretrained(nameless)
    with pytest.raises(ValueError, match="holds no base model and records no base model name"):
        load_meta_kv_model(nameless)


def test_weights_of_another_architecture_are_refused(tmp_path):
    wrapped = get_meta_kv_model(tiny_gpt2(), MetaKVConfig(source="mean"))
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' model cannot load into a 'llama' model"):
        MetaKVModel.from_pretrained(tiny_llama(), tmp_path)
    record = json.loads((tmp_path / "meta_kv_config.json").read_text())
    record["base_model"]["architecture"] = "GPT2DoubleHeadsModel"
    (tmp_path / "meta_kv_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="GPT2DoubleHeadsModel cannot load into a GPT2LMHeadModel"):
        MetaKVModel.from_pretrained(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_merge_and_unload_gives_a_plain_model_that_computes_the_same(factory):
    _, wrapped = base_and_wrapped(factory, MetaKVConfig(source="consolidated", rank=4))
    expected = wrapped(IDS).logits
    plain = wrapped.merge_and_unload()
    assert type(plain) is type(factory()) and not has_meta_kv(plain)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    assert torch.allclose(plain(IDS).logits, expected, atol=1e-5)
    assert not any(key.startswith("meta_kv.") for key in plain.state_dict())
    with pytest.raises(RuntimeError, match="already unloaded"):
        wrapped.unload()


def test_a_dynamic_state_cannot_be_merged():
    _, wrapped = base_and_wrapped(tiny_gpt2, MetaKVConfig(source="mean"))
    with pytest.raises(ValueError, match="only a purely consolidated meta-state can be merged"):
        wrapped.merge_and_unload()
    assert has_meta_kv(wrapped.get_base_model())  # refused before anything was removed


@pytest.mark.parametrize("source", ["consolidated", "attentive"])
def test_unload_and_disable_give_the_base_model(source):
    base_logits, wrapped = base_and_wrapped(tiny_llama, MetaKVConfig(source=source, rank=4))
    modulated = wrapped(IDS).logits
    assert not torch.allclose(modulated, base_logits, atol=1e-3)  # the check below can fail
    with wrapped.disable_meta_kv():
        assert torch.equal(wrapped(IDS).logits, base_logits)
    assert torch.equal(wrapped(IDS).logits, modulated)
    if source == "consolidated":
        wrapped.merge()
        with pytest.raises(RuntimeError, match="call unmerge"), wrapped.disable_meta_kv():
            pass
        wrapped.unmerge()  # W + dW - dW: equal to rounding
    torch.testing.assert_close(wrapped.unload()(IDS).logits, base_logits, atol=1e-5, rtol=0)


def test_print_trainable_parameters_counts_what_trains(capsys):
    wrapped = get_meta_kv_model(tiny_gpt2(), MetaKVConfig(source="mean", rank=4))
    freeze_base(wrapped.get_base_model())
    meta = sum(p.numel() for p in meta_kv_parameters(wrapped))
    total = sum(p.numel() for p in {id(p): p for p in wrapped.parameters()}.values())
    assert wrapped.get_nb_trainable_parameters() == (meta, total)
    wrapped.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {meta:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * meta / total:.4f}\n")


def test_hub_round_trip_goes_through_snapshot_download_and_upload_folder(tmp_path, monkeypatch):
    """The hub cannot be reached here: its two entry points are replaced by a local folder."""
    import huggingface_hub

    _, wrapped = base_and_wrapped(tiny_gpt2, MetaKVConfig(source="max", rank=4))
    expected = wrapped(IDS).logits
    repo = tmp_path / "repo"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message):
            import shutil

            shutil.copytree(folder_path, repo)
            return f"https://hub/{repo_id}/commit/1"

    def fake_download(repo_id, revision=None, token=None, allow_patterns=None):
        calls.append(("download", repo_id, tuple(allow_patterns or ())))
        if repo_id != "user/meta-kv":
            raise RuntimeError("404 Client Error\nRepository Not Found")
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert wrapped.push_to_hub("user/meta-kv") == "https://hub/user/meta-kv/commit/1"
    torch.manual_seed(0)
    loaded = MetaKVModel.from_pretrained(tiny_gpt2(), "user/meta-kv")
    assert torch.equal(loaded(IDS).logits, expected)
    assert calls == [("create", "user/meta-kv"), ("download", "user/meta-kv", ("meta_kv_config.json", "meta_kv.safetensors"))]
    with pytest.raises(FileNotFoundError, match=r"^user/missing: not a local folder, and the hub could not provide it "
                                                r"\(404 Client Error\)$"):
        MetaKVModel.from_pretrained(tiny_gpt2(), "user/missing")
