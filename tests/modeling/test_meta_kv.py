"""Exactness and behaviour of Meta-KV models (GPT-2 and Llama family)."""

import copy

import pytest
import torch

from metakv_cl.modeling import (
    DYNAMIC_SOURCES,
    FORMS,
    SOURCES,
    MetaKVConfig,
    add_meta_kv,
    compile_meta_kv,
    freeze_base,
    get_meta_kv,
    merge_meta_kv,
    meta_kv_parameters,
    remove_meta_kv,
    unmerge_meta_kv,
)
from metakv_cl.testing import VOCAB, left_padded_batch, randomize_meta_kv, stepwise_logits, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("source", SOURCES)
def test_fresh_meta_kv_equals_base_model(tiny_model_factory, source, form, attn_implementation):
    model = tiny_model_factory(attn_implementation)
    ids, mask, positions = left_padded_batch()
    reference = model(ids, attention_mask=mask, position_ids=positions).logits
    add_meta_kv(model, MetaKVConfig(source=source, form=form, rank=4, state_dim=16))
    wrapped = model(ids, attention_mask=mask, position_ids=positions).logits
    assert (wrapped - reference).abs().max().item() <= 1e-6


def test_randomized_meta_kv_changes_the_output(tiny_model_factory):
    model = tiny_model_factory()
    ids, _, _ = left_padded_batch()
    reference = model(ids).logits
    add_meta_kv(model, MetaKVConfig(source="mean"))
    randomize_meta_kv(model)
    assert (model(ids).logits - reference).abs().max().item() > 1e-2


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("source", DYNAMIC_SOURCES + ("hybrid", "addressed"))
def test_cached_decoding_equals_full_forward(tiny_model_factory, source, form):
    model = tiny_model_factory()
    add_meta_kv(model, MetaKVConfig(source=source, form=form, rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    for prefill in (1, 5):
        step = stepwise_logits(model, ids, mask, positions, prefill)
        difference = ((full - step).abs() * mask[..., None]).max().item()
        assert difference <= 1e-4, f"prefill {prefill}: {difference}"


@pytest.mark.parametrize("source", DYNAMIC_SOURCES + ("addressed",))
def test_generate_equals_full_forward(tiny_model_factory, source):
    model = tiny_model_factory()
    add_meta_kv(model, MetaKVConfig(source=source, rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, _ = left_padded_batch(length=8)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    sequences = out.sequences
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], 6, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    full = model(sequences, attention_mask=full_mask, position_ids=positions).logits
    generated = torch.stack(out.logits, dim=1)  # logits that produced each new token
    reference = full[:, ids.shape[1] - 1 : -1]
    assert (generated - reference).abs().max().item() <= 1e-4


def test_compiled_meta_kv_layers_equal_eager_in_cached_decoding():
    model = tiny_gpt2()
    add_meta_kv(model, MetaKVConfig(source="mean", rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    eager = stepwise_logits(model, ids, mask, positions, prefill=5)
    compiled = stepwise_logits(compile_meta_kv(copy.deepcopy(model)), ids, mask, positions, prefill=5)
    assert ((eager - compiled).abs() * mask[..., None]).max().item() <= 1e-5


def test_dynamic_state_ignores_padding():
    """A left-padded row computes what the same row computes unpadded."""
    model = tiny_llama()
    add_meta_kv(model, MetaKVConfig(source="recurrent", rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    padded = model(ids, attention_mask=mask, position_ids=positions).logits[2, 4:]
    alone = model(ids[2:, 4:]).logits[0]
    assert (padded - alone).abs().max().item() <= 1e-4


@pytest.mark.parametrize("form", FORMS)
def test_merged_equals_unmerged(tiny_model_factory, form):
    model = tiny_model_factory()
    add_meta_kv(model, MetaKVConfig(source="consolidated", form=form))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("meta_kv.")}
    unmerged = model(ids, attention_mask=mask, position_ids=positions).logits
    merge_meta_kv(model)
    merged = model(ids, attention_mask=mask, position_ids=positions).logits
    assert (merged - unmerged).abs().max().item() <= 1e-4
    assert any((model.state_dict()[k] - v).abs().max() > 0 for k, v in base_weights.items())
    unmerge_meta_kv(model)
    for key, value in base_weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-5, rtol=0)
    assert (model(ids, attention_mask=mask, position_ids=positions).logits - unmerged).abs().max().item() <= 1e-5


def test_merge_rejects_dynamic_sources_and_training():
    model = tiny_gpt2()
    add_meta_kv(model, MetaKVConfig(source="hybrid"))
    with pytest.raises(ValueError, match="only a purely consolidated"):
        merge_meta_kv(model)
    model = tiny_gpt2()
    add_meta_kv(model, MetaKVConfig(source="consolidated"))
    merge_meta_kv(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_meta_kv(model)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge_meta_kv"):
        model(torch.randint(0, VOCAB, (1, 4)))


def test_gradients_reach_every_meta_kv_group_and_not_the_frozen_base():
    model = tiny_gpt2().train()
    add_meta_kv(model, MetaKVConfig(source="hybrid", hybrid_dynamic="attentive"))
    freeze_base(model)
    optimizer = torch.optim.SGD(meta_kv_parameters(model), lr=0.1)
    ids = torch.randint(0, VOCAB, (2, 16))
    for _ in range(2):  # B starts at zero: the generators get gradients from the second step
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    for group in ("memory", "generator", "source"):
        grads = [p.grad for p in meta_kv_parameters(model, group)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), group
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("meta_kv."))


def test_deepcopy_gives_an_independent_model():
    model = tiny_gpt2()
    add_meta_kv(model, MetaKVConfig(source="mean"))
    randomize_meta_kv(model)
    ids = torch.randint(0, VOCAB, (2, 8))
    teacher = copy.deepcopy(model)
    before = teacher(ids).logits
    randomize_meta_kv(model, seed=7)
    assert (teacher(ids).logits - before).abs().max().item() == 0.0
    assert (model(ids).logits - before).abs().max().item() > 1e-3


def test_remove_restores_the_base_model():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 8))
    reference = model(ids).logits
    add_meta_kv(model, MetaKVConfig(source="max"))
    randomize_meta_kv(model)
    remove_meta_kv(model)
    assert not hasattr(model, "meta_kv")
    assert (model(ids).logits - reference).abs().max().item() == 0.0


def test_shared_memory_is_one_parameter():
    model = tiny_gpt2()
    add_meta_kv(model, MetaKVConfig(source="consolidated", share_memory=True, memory_slots=3, state_dim=8))
    memory = meta_kv_parameters(model, "memory")
    assert len(memory) == 1 and memory[0].shape == (3, 8)
    assert get_meta_kv(model).memory_for(0) is get_meta_kv(model).memory_for(1)


def test_rank_above_head_dimension_is_rejected():
    with pytest.raises(ValueError, match="larger than the head dimension 16"):
        add_meta_kv(tiny_gpt2(), MetaKVConfig(rank=32))


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown meta-state source 'average'"):
        MetaKVConfig(source="average")
    with pytest.raises(ValueError, match="unknown modulation form"):
        MetaKVConfig(form="dense")
    with pytest.raises(ValueError, match="unknown MetaKVConfig keys \\['rnak'\\]"):
        MetaKVConfig.from_dict({"rnak": 4})
    with pytest.raises(ValueError, match="unknown Meta-KV parameter group"):
        meta_kv_parameters(add_meta_kv(tiny_gpt2()), "weights")


def test_unsupported_architecture_is_rejected():
    with pytest.raises(ValueError, match="unsupported Sequential: it has no config.model_type; metakv-cl supports"):
        add_meta_kv(torch.nn.Sequential(torch.nn.Linear(4, 4)), MetaKVConfig())


def test_adding_twice_is_rejected():
    model = add_meta_kv(tiny_gpt2())
    with pytest.raises(ValueError, match="already has Meta-KV"):
        add_meta_kv(model)


def test_recurrent_source_runs_in_float32_without_changing_its_weights():
    from metakv_cl.modeling.sources import RecurrentSource

    source = RecurrentSource(16, 8).to(torch.bfloat16)
    c, _ = source(torch.randn(2, 5, 16, dtype=torch.bfloat16), None, None)
    c.float().sum().backward()
    assert c.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and p.grad is not None for p in source.gru.parameters())


def test_a_pickled_meta_kv_model_is_its_own_working_copy(tiny_model_factory):
    """ddp_spawn and multiprocessing workers pickle the model: the copy decodes on its own state."""
    import pickle

    model = tiny_model_factory()
    add_meta_kv(model, MetaKVConfig(source="recurrent", rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    stepwise_logits(model, ids, mask, positions, prefill=3)  # leaves running states in the original
    copy_ = pickle.loads(pickle.dumps(model))
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    copied = copy_(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(full, copied)
    step = stepwise_logits(copy_, ids, mask, positions, prefill=3)
    assert ((full - step).abs() * mask[..., None]).max().item() <= 1e-4
    randomize_meta_kv(copy_, seed=7)  # the copy's hooks drive the copy's parameters, not the original's
    assert not torch.allclose(copy_(ids, attention_mask=mask, position_ids=positions).logits, copied)
    assert torch.equal(model(ids, attention_mask=mask, position_ids=positions).logits, full)
