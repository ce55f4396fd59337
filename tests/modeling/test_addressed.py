"""The addressed meta-state: a bank of slots that each token reads by content (issue 17).

Exactness at initialisation, cached decoding, generate(), left padding, packing and save/load
are covered by the parametrized tests of every source; these tests cover what is new."""

import pytest
import torch

from metakv_cl.modeling import (
    MetaKVConfig,
    SlotReadRecorder,
    add_meta_kv,
    freeze_base,
    get_meta_kv,
    meta_kv_parameters,
)
from metakv_cl.modeling.sources import AddressedMemory
from metakv_cl.testing import VOCAB, left_padded_batch, randomize_meta_kv, tiny_llama


def test_each_token_reads_its_own_mixture_of_open_slots():
    torch.manual_seed(0)
    bank = AddressedMemory(slots=6, state_dim=8)
    summary = torch.randn(2, 5, 8)
    weights = bank.read_weights(summary)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert weights.flatten(0, 1).std(0).min() > 0  # tokens differ in what they read
    bank.open_slots(2)
    weights = bank.read_weights(summary)
    assert torch.equal(weights[..., 2:], torch.zeros(2, 5, 4))
    torch.testing.assert_close(bank(summary), weights[..., :2] @ bank.values[:2])
    for count in (0, 7):
        with pytest.raises(ValueError, match=f"between 1 and the bank's 6 slots, got {count}"):
            bank.open_slots(count)


def test_the_output_depends_on_the_open_slots_and_gradients_reach_the_bank():
    torch.manual_seed(0)
    model = add_meta_kv(tiny_llama(), MetaKVConfig(source="addressed", memory_slots=4, rank=4, state_dim=16))
    randomize_meta_kv(model)
    freeze_base(model)
    ids, mask, positions = left_padded_batch()
    all_open = model(ids, attention_mask=mask, position_ids=positions).logits
    for layer in get_meta_kv(model).layers:
        layer.bank.open_slots(2)
    two_open = model(ids, attention_mask=mask, position_ids=positions).logits
    assert (all_open - two_open).abs().max() > 1e-3
    two_open.float().logsumexp(-1).sum().backward()
    bank = meta_kv_parameters(model, "memory")
    assert bank and all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank)
    closed = get_meta_kv(model).layers[0].bank.keys.grad[2:]
    assert torch.equal(closed, torch.zeros_like(closed))  # a closed slot learns nothing


def test_addressed_layers_stay_on_the_torch_decoding_path_and_refuse_a_shared_bank():
    pytest.importorskip("triton")
    from metakv_cl.modeling.fused_decode import FusedDecodeStep

    model = add_meta_kv(tiny_llama(), MetaKVConfig(source="addressed", rank=4, state_dim=16))
    assert not any(FusedDecodeStep.supports(layer) for layer in get_meta_kv(model).layers)
    with pytest.raises(ValueError, match="meta_kv.share_memory: the addressed bank is per layer"):
        MetaKVConfig(source="addressed", share_memory=True)
    with pytest.raises(ValueError, match="meta_kv.addressed_summary: unknown addressed_summary source 'hybrid'"):
        MetaKVConfig(source="addressed", addressed_summary="hybrid")


def test_the_slot_reads_are_counted_on_real_tokens_only():
    torch.manual_seed(0)
    model = add_meta_kv(tiny_llama(), MetaKVConfig(source="addressed", memory_slots=4, rank=4, state_dim=16))
    randomize_meta_kv(model)
    ids, mask, positions = left_padded_batch()
    with SlotReadRecorder(model) as padded:
        model(ids, attention_mask=mask, position_ids=positions)
    assert padded.tokens == int(mask.sum())
    with SlotReadRecorder(model) as row_by_row:  # each row alone, without its padding
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            model(ids[row][real][None], position_ids=positions[row][real][None])
    torch.testing.assert_close(padded.mean(), row_by_row.mean())
    torch.testing.assert_close(padded.mean().sum(-1), torch.ones(2, dtype=torch.float64))
    assert not get_meta_kv(model).layers[0].bank._forward_hooks  # the recorder let go of the model
    with pytest.raises(ValueError, match="reading slots needs source 'addressed'; this model's source is 'mean'"):
        SlotReadRecorder(add_meta_kv(tiny_llama(), MetaKVConfig(source="mean", rank=4, state_dim=16)))
