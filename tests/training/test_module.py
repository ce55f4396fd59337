"""The LightningModule: loss, penalties, non-finite loss errors, evaluation scores."""

import math

import pytest
import pytorch_lightning as pl
import torch

from metakv_cl.data.stream import make_benchmark, word_level_tokenizer
from metakv_cl.data.tasks import ClassificationTask
from metakv_cl.strategies import Naive
from metakv_cl.testing import tiny_gpt2
from metakv_cl.training.module import ContinualLMModule, NonFiniteLossError
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs


def validate(module, dataset, batch_size=5):
    from metakv_cl.training.datamodule import EvaluationDataModule

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=EvaluationDataModule(dataset, batch_size=batch_size), verbose=False)
    return module.eval_result


def test_language_modelling_score_is_the_token_weighted_mean_loss():
    torch.manual_seed(0)
    benchmark, module = toy_setup(1)
    dataset = benchmark.test_stream[0].dataset
    result = validate(module, dataset, batch_size=5)  # batches of unequal token counts
    item_nll, item_tokens = [], []
    module.eval()
    with torch.no_grad():
        for item in dataset:
            ids = item["input_ids"][None]
            logits = module.model(input_ids=ids).logits[0, :-1]
            item_nll.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")))
            item_tokens.append(ids.shape[1] - 1)
    total, tokens = sum(item_nll), sum(item_tokens)
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["tokens"] == tokens and result["examples"] == len(dataset)
    assert "accuracy" not in result
    # each item's outcome, in test-set order
    assert module.eval_items["tokens"] == item_tokens
    assert module.eval_items["nll"] == pytest.approx(item_nll, abs=1e-4)


def sentiment_stream():
    task = ClassificationTask(
        "sentiment",
        train=[("good film", "positive"), ("bad film", "negative")],
        test=[("good plot", "positive"), ("bad acting", "negative"), ("fine music", "very positive")],
        labels=["positive", "negative", "very positive"],
    )
    tokenizer = word_level_tokenizer(["good bad fine film plot acting music Answer : positive negative very"])
    return task, tokenizer, make_benchmark([task], tokenizer, max_length=32)


def label_ids(tokenizer, label):
    """A label string's tokens as the stream builds them: a space, the label, end-of-text."""
    return tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("ranking", ["sum", "mean"])
def test_classification_accuracy_ranks_label_strings_by_likelihood(ranking):
    task, tokenizer, benchmark = sentiment_stream()
    torch.manual_seed(0)
    module = ContinualLMModule(tiny_gpt2(vocab_size=len(tokenizer)), ranking=ranking)
    result = validate(module, benchmark.test_stream[0].dataset, batch_size=2)
    # brute force: score each label string on its own
    module.eval()
    correct, predicted = 0, []
    with torch.no_grad():
        for text, label in task.test:
            scores = []
            for candidate in task.labels:
                prompt = tokenizer(task.prompt(text), add_special_tokens=False)["input_ids"]
                answer = label_ids(tokenizer, candidate)
                ids = torch.tensor([prompt + answer])
                log_probs = module.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                positions = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
                log_likelihood = sum(float(log_probs[p, ids[0, p + 1]]) for p in positions)
                scores.append(log_likelihood / len(answer) if ranking == "mean" else log_likelihood)
            predicted.append(max(range(len(scores)), key=scores.__getitem__))
            correct += task.labels[predicted[-1]] == label
    assert result["accuracy"] == pytest.approx(correct / len(task.test))
    assert math.isfinite(result["loss"])
    assert "exact_match" not in result  # off by default
    assert module.eval_items == {"predicted": predicted, "gold": [0, 1, 2], "num_choices": 3}


def test_generative_exact_match_counts_the_items_whose_greedy_decoding_is_the_gold_label():
    """A model trained to answer "negative" to everything is right on the negative item only; the
    verdicts are those of generate() run by hand on each prompt."""
    task, tokenizer, benchmark = sentiment_stream()
    torch.manual_seed(0)
    module = ContinualLMModule(tiny_gpt2(vocab_size=len(tokenizer)), exact_match=True)
    train = benchmark.train_stream[0].dataset
    batch = train.collate_fn([train[1]])  # ("bad film", "negative")
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    module.model.train()
    for _ in range(30):
        loss = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = validate(module, benchmark.test_stream[0].dataset, batch_size=2)
    module.eval()
    longest = max(len(label_ids(tokenizer, label)) for label in task.labels)
    by_hand = []
    with torch.no_grad():
        for text, label in task.test:
            prompt = torch.tensor([tokenizer(task.prompt(text), add_special_tokens=False)["input_ids"]])
            generated = module.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=longest,
                                              do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:]
            gold = label_ids(tokenizer, label)
            by_hand.append(generated[: len(gold)].tolist() == gold)
    assert by_hand == [False, True, False]
    assert module.eval_items["generated_correct"] == by_hand
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert "accuracy" in result  # reported beside the ranking accuracy


def test_nan_loss_stops_with_the_experience_and_step_named(tmp_path):
    torch.manual_seed(0)
    benchmark, module = toy_setup(1)
    strategy = Naive(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path, max_epochs=2), train_mb_size=8)
    strategy.experience_names = benchmark.experience_names
    calls = []

    def explode_at_step_three(module, batch, outputs):
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == 4 else 0.0)

    module.penalties["explode"] = explode_at_step_three
    with pytest.raises(NonFiniteLossError, match=r"experience 0 \('people'\) at global step 3 .*explode=nan"):
        strategy.train(benchmark.train_stream[0], eval_streams=[])


def explode_at_step(step):
    """A penalty that is NaN at training step ``step`` (0-based) and 0 elsewhere; its calls count the steps."""
    calls = []

    def penalty(module, batch, outputs):
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == step + 1 else 0.0)

    return penalty, calls


def test_nan_loss_is_found_once_per_window_and_named_by_its_own_step(tmp_path, monkeypatch):
    monkeypatch.setattr(ContinualLMModule, "nonfinite_check_interval", 4)
    torch.manual_seed(0)
    benchmark, module = toy_setup(1)  # 42 items: 6 batches of 8 per epoch
    strategy = Naive(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=8)
    strategy.experience_names = benchmark.experience_names
    module.penalties["explode"], calls = explode_at_step(1)
    with pytest.raises(NonFiniteLossError, match=r"at global step 1 \(epoch 0, batch 1\); components: .*explode=nan"):
        strategy.train(benchmark.train_stream[0], eval_streams=[])
    assert len(calls) == 4  # the host looked at the losses once, after the window of 4 steps


def test_nan_loss_in_an_epochs_last_batch_stops_before_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    benchmark, module = toy_setup(1)
    strategy = Naive(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path, max_epochs=2), train_mb_size=8)
    module.penalties["explode"], calls = explode_at_step(5)
    with pytest.raises(NonFiniteLossError, match=r"at global step 5 \(epoch 0, batch 5\)"):
        strategy.train(benchmark.train_stream[0], eval_streams=[])
    assert len(calls) == 6 and not list(tmp_path.rglob("*.ckpt"))


def test_penalties_add_to_the_loss_and_phase_restores_the_objective():
    torch.manual_seed(0)
    benchmark, module = toy_setup(1)
    batch = benchmark.train_stream[0].dataset.collate_fn([benchmark.train_stream[0].dataset[i] for i in range(4)])
    module.penalties["constant"] = lambda m, b, o: torch.tensor(2.5)
    with module.phase(lr=0.5, lm_loss_weight=0.0, penalties={"extra": lambda m, b, o: torch.tensor(1.0)}):
        assert module.lr == 0.5 and set(module.penalties) == {"constant", "extra"}
        assert float(module.training_step(batch, 0)) == pytest.approx(3.5)
    assert module.lr == 3e-3 and module.lm_loss_weight == 1.0 and set(module.penalties) == {"constant"}


def test_token_nll_equals_sequence_nll_in_shapes_known_before_the_values():
    from metakv_cl.data.scoring import sequence_nll
    from metakv_cl.training.module import token_nll

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 9, 17), torch.randint(0, 17, (3, 9))
    labels[0, :4] = -100
    labels[2, 6:] = -100
    for got, want in zip(token_nll(logits, labels), sequence_nll(logits, labels)):
        assert torch.equal(got, want)
    # meta tensors carry no values: every shape is fixed before the device computes anything
    nll, count = token_nll(logits.to("meta"), labels.to("meta"))
    assert nll.shape == count.shape == (3,)


def test_vocab_size_needs_a_from_scratch_model():
    with pytest.raises(ValueError, match="vocab_size=100 needs from_scratch=True"):
        ContinualLMModule("gpt2", vocab_size=100)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        ContinualLMModule(tiny_gpt2(), lr_schedule="step")


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_against_transformers_get_scheduler(kind):
    """Why the schedule is not ``transformers.get_scheduler``: the multipliers, step by step."""
    from transformers import get_scheduler

    from metakv_cl.training.module import _schedule

    warmup, total = 5, 60
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    theirs = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
    ours = _schedule(kind, warmup, total)
    # warm-up: one step ahead (theirs trains its first step at rate 0)
    assert [ours(step) for step in range(warmup)] == [theirs(step + 1) for step in range(warmup)]
    assert theirs(0) == 0.0
    after_warmup = range(warmup, total + 1)
    if kind == "linear":  # the same decay, rounded differently
        assert [ours(step) for step in after_warmup] == pytest.approx([theirs(step) for step in after_warmup],
                                                                      rel=1e-15, abs=1e-15)
        assert any(ours(step) != theirs(step) for step in after_warmup)
    else:
        assert [ours(step) for step in after_warmup] == [theirs(step) for step in after_warmup]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_training_forward_matches_eager_with_meta_kv(packed):
    import copy

    from metakv_cl.modeling import MetaKVConfig, add_meta_kv, meta_kv_parameters
    from metakv_cl.training.packing import pack_items

    torch.manual_seed(0)
    model = add_meta_kv(tiny_gpt2(), MetaKVConfig(source="mean", rank=4, state_dim=16))
    with torch.no_grad():
        for parameter in meta_kv_parameters(model):
            parameter.normal_(std=0.3)
    eager = ContinualLMModule(model)
    compiled = ContinualLMModule(copy.deepcopy(model), compile=True)
    ids = torch.randint(1, 90, (3, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if packed:  # documents of 12, 7 and 5 tokens in rows of 12 (a packed row of two)
        lengths = (12, 7, 5)
        batch = pack_items([{"input_ids": row[:n], "labels": row[:n]} for row, n in zip(ids, lengths)], 12)[0]
    losses = []
    for module in (eager, compiled):
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    grads = [meta_kv_parameters(module.model)[-1].grad for module in (eager, compiled)]
    assert grads[0] is not None and torch.allclose(grads[0], grads[1], atol=1e-5)
    assert not any("_compiled" in name for name, _ in compiled.named_modules())


def test_exact_match_reaches_the_stream_result(tmp_path):
    from metakv_cl.report import MethodResult
    from metakv_cl.training.runner import run_stream

    _, tokenizer, benchmark = sentiment_stream()
    torch.manual_seed(0)
    module = ContinualLMModule(tiny_gpt2(vocab_size=len(tokenizer)), exact_match=True, ranking="mean")
    strategy = Naive(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=2)
    result = run_stream(strategy, benchmark, root_dir=tmp_path / "run")
    assert result.exact_match_matrix[-1] == [strategy.eval_results[0]["exact_match"]]
    assert result.items["generated_correct"][-1] == [module.eval_items["generated_correct"]]
    assert result.extra["module"]["ranking"] == "mean" and result.extra["module"]["exact_match"] is True
    written = MethodResult.from_json((tmp_path / "run" / "stream_state" / "result.json").read_text())
    assert written.exact_match_matrix == result.exact_match_matrix and len(written.exact_match_matrix) == 2
