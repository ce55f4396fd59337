"""Scoring: masked next-token NLL, candidate ranking (summed or mean log-likelihood) on full rows
vs on one shared prompt run, and greedy decoding for generative exact match."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metakv_cl import MetaKVConfig, add_meta_kv
from metakv_cl.modeling import SOURCES
from metakv_cl.data import ClassificationTask, IGNORE_INDEX, make_benchmark, word_level_tokenizer
from metakv_cl.data.scoring import (
    RANKINGS,
    generated_exact_match,
    greedy_decode,
    rank_choices,
    rank_choices_and_exact_match,
    rank_choices_with_shared_prompt,
    sequence_nll,
    shared_prompts,
)
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
    for ranking in RANKINGS:
        with torch.no_grad():
            full, full_predictions = rank_choices(model, *inputs, ranking=ranking)
            shared, shared_predictions = rank_choices_with_shared_prompt(model, *inputs, ranking=ranking)
        assert torch.allclose(full, shared, atol=1e-4), (full, shared)
        assert torch.equal(full_predictions, shared_predictions), ranking


def test_mean_ranking_prefers_a_longer_label_of_likelier_tokens():
    """Every position predicts token 1 with p = 0.3 and token 2 with p = 0.6. Candidate [1] sums to
    log 0.3 = -1.20 and candidate [2, 2, 2] to 3 log 0.6 = -1.53 (sum prefers [1]); per token
    they are -1.20 and -0.51 (mean prefers [2, 2, 2])."""
    log_probs = torch.tensor([0.05, 0.3, 0.6, 0.05]).log()

    def forward(input_ids, attention_mask):
        return SimpleNamespace(logits=log_probs.expand(*input_ids.shape, 4))

    ids = torch.tensor([[[3, 3, 1, 0, 0], [3, 3, 2, 2, 2]]])
    no = IGNORE_INDEX
    labels = torch.tensor([[[no, no, 1, no, no], [no, no, 2, 2, 2]]])
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]])
    summed, by_sum = rank_choices(forward, ids, labels, mask, ranking="sum")
    same, by_mean = rank_choices(forward, ids, labels, mask, ranking="mean")
    assert torch.allclose(summed, torch.tensor([[0.3, 0.6**3]]).log())
    assert torch.equal(same, summed)  # the scores stay summed; only the choice changes
    assert by_sum.tolist() == [0] and by_mean.tolist() == [1]
    with pytest.raises(ValueError, match="unknown ranking 'max'; choose one of sum, mean"):
        rank_choices(forward, ids, labels, mask, ranking="max")


def make_variant(make, variant):
    torch.manual_seed(0)
    model = make(vocab_size=64)
    return {"plain": lambda m: m, "lora": lora_wrapped}.get(variant, with_meta_kv(variant))(model)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["plain", "lora", *SOURCES])
def test_greedy_decoding_of_a_padded_batch_equals_generate_prompt_by_prompt(make, variant):
    """Prompts of 7, 3 and 4 tokens decoded together (right-padded) decode what generate() decodes
    for each prompt alone; generate stops at end-of-text, so its tokens are a prefix of ours."""
    model = make_variant(make, variant)
    batch = choice_batch()
    prompt_ids, prompt_mask, prompt_lengths, _ = shared_prompts(
        batch["choice_input_ids"], batch["choice_labels"], batch["choice_attention_mask"]
    )
    assert prompt_lengths.unique().numel() == 3
    with torch.no_grad():
        decoded = greedy_decode(model, prompt_ids, prompt_mask, max_new_tokens=6)
        for row, length in enumerate(prompt_lengths.tolist()):
            prompt = prompt_ids[row : row + 1, :length]
            generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                       do_sample=False, pad_token_id=0)[0, length:]
            assert torch.equal(decoded[row, : len(generated)], generated), (row, decoded[row], generated)


def choice_rows(prompts: list[list[int]], candidates: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """``choice_input_ids``, ``choice_labels`` and ``choice_attention_mask`` of prompts that share
    the candidate label token lists, right-padded as the collator pads them."""
    width = max(map(len, prompts)) + max(map(len, candidates))
    shape = (len(prompts), len(candidates), width)
    ids, mask = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX)
    for b, prompt in enumerate(prompts):
        for c, candidate in enumerate(candidates):
            row = prompt + candidate
            ids[b, c, : len(row)] = torch.tensor(row)
            labels[b, c, len(prompt) : len(row)] = torch.tensor(candidate)
            mask[b, c, : len(row)] = 1
    return ids, labels, mask


def test_exact_match_is_right_only_for_the_decoded_label_and_does_not_depend_on_the_batch():
    model = make_variant(tiny_gpt2, "plain")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    rows = choice_rows(prompts, [[40], [41, 42, 43]])
    with torch.no_grad():
        prompt_ids, prompt_mask, _, _ = shared_prompts(*rows)
        decoded = greedy_decode(model, prompt_ids, prompt_mask, max_new_tokens=3)
    assert not torch.equal(decoded[0], decoded[1])  # the two prompts continue differently
    # per prompt: its own greedy continuation (right), the other prompt's (wrong), a one-token label
    for b, prompt in enumerate(prompts):
        own, other = decoded[b].tolist(), decoded[1 - b].tolist()
        candidates = [own, other, [(own[0] + 1) % 64]]
        inputs = choice_rows([prompt], candidates)
        with torch.no_grad():
            verdicts = [bool(generated_exact_match(model, *inputs, torch.tensor([gold]))) for gold in range(3)]
        assert verdicts == [True, False, False]
    # batched (mixed prompt lengths, padding) equals one by one
    candidates = [decoded[0].tolist(), decoded[1].tolist()]
    gold = torch.tensor([0, 0])
    with torch.no_grad():
        together = generated_exact_match(model, *choice_rows(prompts, candidates), gold)
        alone = [bool(generated_exact_match(model, *choice_rows([p], candidates), gold[:1])) for p in prompts]
    assert together.tolist() == alone == [True, False]


class CountingForward:
    """A model's forward that counts its calls (``forward`` is what the scoring functions ask for the cache name)."""

    def __init__(self, model):
        self.forward, self.calls = model.forward, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.forward(**inputs)


def exact_match_by_full_decoding(model, choice_input_ids, choice_labels, choice_attention_mask, target):
    """Exact match as a plain reading of its definition: decode the longest candidate's length, compare the gold prefix."""
    prompt_ids, prompt_mask, prompt_lengths, label_lengths = shared_prompts(
        choice_input_ids, choice_labels, choice_attention_mask
    )
    decoded = greedy_decode(model, prompt_ids, prompt_mask, int(label_lengths.max()))
    verdicts = []
    for b, gold in enumerate(target.tolist()):
        length = int(label_lengths[b, gold])
        start = int(prompt_lengths[b])
        verdicts.append(torch.equal(decoded[b, :length], choice_labels[b, gold, start : start + length]))
    return torch.tensor(verdicts)


def continuation_rows(model):
    """Prompts of 7, 2 and 4 tokens (right-padded together) with candidates that are, per prompt, its own greedy
    continuation of 3 tokens, of 1 token, of 3 tokens with the last one changed, and another prompt's."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    rows = choice_rows(prompts, [[1]])
    with torch.no_grad():
        prompt_ids, prompt_mask, _, _ = shared_prompts(*rows)
        own = greedy_decode(model, prompt_ids, prompt_mask, max_new_tokens=3).tolist()
    changed_last = [continuation[:2] + [(continuation[2] + 1) % 64] for continuation in own]
    # one candidate list per batch: each gold is one prompt's own continuation, a prefix of it or a near miss
    candidates = [own[0], own[1][:1], changed_last[2], own[2], own[1]]
    return prompts, candidates


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["plain", "lora", *SOURCES])
def test_exact_match_from_the_candidates_pass_gives_the_verdicts_of_decoding(make, variant):
    """Verdicts read off the gold candidate's pass equal those of decoding every prompt to the longest candidate,
    and the ranking is the shared-prompt ranking's bit for bit; dynamic Meta-KV state included."""
    model = make_variant(make, variant)
    prompts, candidates = continuation_rows(model)
    inputs = choice_rows(prompts, candidates)
    golds = [torch.tensor(gold) for gold in ([0, 1, 3], [0, 4, 2], [2, 1, 4], [4, 4, 4])]
    verdicts = set()
    for ranking in RANKINGS:
        for gold in golds:
            with torch.no_grad():
                alone = rank_choices_with_shared_prompt(model, *inputs, ranking=ranking)
                expected = exact_match_by_full_decoding(model, *inputs, gold)
                log_likelihoods, predictions, generated_correct = rank_choices_and_exact_match(
                    model, *inputs, gold, ranking=ranking
                )
                separately = generated_exact_match(model, *inputs, gold)
            assert torch.equal(log_likelihoods, alone[0]) and torch.equal(predictions, alone[1])
            assert generated_correct.tolist() == separately.tolist() == expected.tolist(), gold
            verdicts.update(expected.tolist())
    assert verdicts == {True, False}


def test_exact_match_beside_the_ranking_decodes_nothing_and_alone_stops_once_settled():
    model = make_variant(tiny_gpt2, "plain")
    prompts, candidates = continuation_rows(model)
    inputs = choice_rows(prompts, candidates)
    counting = CountingForward(model)

    def calls(gold, score):
        counting.calls = 0
        with torch.no_grad():
            score(counting, *inputs, torch.tensor(gold))
        return counting.calls

    # beside the ranking: its prompt pass and candidates' pass, whatever the golds
    for gold in ([0, 1, 3], [1, 1, 1], [4, 0, 4], [2, 4, 2]):
        assert calls(gold, rank_choices_and_exact_match) == 2
    # alone: the prompt pass, then decoding steps after the first token until every verdict is settled
    assert calls([0, 1, 3], generated_exact_match) == 1 + 2  # prompt 0 matches its 3-token gold to the end
    assert calls([1, 1, 1], generated_exact_match) == 1 + 0  # one-token golds: settled by the prompt pass
    assert calls([4, 0, 4], generated_exact_match) == 1 + 0  # every item is off its gold label at the first token


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
