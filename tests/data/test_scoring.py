"""Scoring: masked next-token NLL, and candidate ranking on full rows vs on one shared prompt run."""

import pytest
import torch
import torch.nn.functional as F

from metakv_cl import MetaKVConfig, add_meta_kv
from metakv_cl.modeling import SOURCES
from metakv_cl.data import ClassificationTask, IGNORE_INDEX, make_benchmark, word_level_tokenizer
from metakv_cl.data.scoring import rank_choices, rank_choices_with_shared_prompt, sequence_nll
from metakv_cl.strategies.plugins.lora import add_lora_adapter, make_lora_config
from metakv_cl.testing import randomize_meta_kv, tiny_gpt2, tiny_llama
from metakv_cl.training import ContinualLMModule


def test_sequence_nll_scores_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, 4, IGNORE_INDEX, 7, 1], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    nll, count = sequence_nll(logits, labels)
    expected = torch.zeros(2)
    for row in range(2):
        for t in range(1, 5):
            if labels[row, t] != IGNORE_INDEX:
                expected[row] -= F.log_softmax(logits[row, t - 1], dim=-1)[labels[row, t]]
    assert torch.allclose(nll, expected, atol=1e-5)
    assert count.tolist() == [3, 2]


def choice_batch():
    """Three test examples whose prompts and candidates have different lengths."""
    task = ClassificationTask(
        "t",
        train=[("a b c", "yes")],
        test=[("a b c d e", "yes"), ("x", "no way"), ("a b", "maybe not at all")],
        labels=["yes", "no way", "maybe not at all"],
    )
    tokenizer = word_level_tokenizer([task.prompt(text) + " " + label for text, label in task.test] + list(task.labels))
    dataset = make_benchmark([task], tokenizer, max_length=32).test_stream[0].dataset
    return dataset.collate_fn([dataset[i] for i in range(len(dataset))])


def lora_wrapped(model):
    holder = ContinualLMModule(model)
    add_lora_adapter(holder, "a", make_lora_config(model, rank=2, alpha=4.0))
    for name, parameter in holder.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    return holder.model


def with_meta_kv(source):
    def add(model):
        add_meta_kv(model, MetaKVConfig(source=source, rank=4, state_dim=16))
        randomize_meta_kv(model)  # B starts at zero: make the modulation act
        return model

    return add


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["plain", "lora", *SOURCES])
def test_shared_prompt_scores_equal_full_rows(make, variant):
    """Dynamic sources included: the repeated prompt cache carries the prompt's meta-state."""
    torch.manual_seed(0)
    model = make(vocab_size=64)
    model = {"plain": lambda m: m, "lora": lora_wrapped}.get(variant, with_meta_kv(variant))(model)
    batch = choice_batch()
    inputs = (batch["choice_input_ids"], batch["choice_labels"], batch["choice_attention_mask"])
    with torch.no_grad():
        full, full_predictions = rank_choices(model, *inputs)
        shared, shared_predictions = rank_choices_with_shared_prompt(model, *inputs)
    assert torch.allclose(full, shared, atol=1e-4), (full, shared)
    assert torch.equal(full_predictions, shared_predictions)


def test_shared_prompt_refuses_rows_with_different_prompts():
    batch = choice_batch()
    labels = batch["choice_labels"].clone()
    labels[0, 1] = IGNORE_INDEX
    labels[0, 1, -1] = 3  # the second candidate now "starts" elsewhere
    with pytest.raises(ValueError, match="share one prompt"):
        rank_choices_with_shared_prompt(tiny_gpt2(vocab_size=64), batch["choice_input_ids"], labels,
                                        batch["choice_attention_mask"])


def test_every_model_scores_on_a_shared_prompt_unless_told_not_to():
    for meta_kv in (None, MetaKVConfig(source="mean", rank=4), MetaKVConfig(source="consolidated", rank=4)):
        assert ContinualLMModule(tiny_gpt2(vocab_size=64), meta_kv=meta_kv).scores_on_shared_prompt()
    assert not ContinualLMModule(tiny_gpt2(vocab_size=64), shared_prompt_scoring=False).scores_on_shared_prompt()
