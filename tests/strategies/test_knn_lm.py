"""The kNN-LM method: each experience's training text goes to a datastore that evaluation reads."""

import pytest
import torch

pytest.importorskip("faiss")

from metakv_cl.data import ClassificationTask, make_benchmark, word_level_tokenizer  # noqa: E402
from metakv_cl.data.stream import TaskStream  # noqa: E402
from metakv_cl.strategies import KNNLM, ContinualStrategy, MetaKVConsolidation, Naive, plugins  # noqa: E402
from metakv_cl.strategies.plugins import PluginConflictError  # noqa: E402
from metakv_cl.testing import tiny_gpt2  # noqa: E402
from metakv_cl.training import ContinualLMModule  # noqa: E402
from metakv_cl.training.runner import run_stream  # noqa: E402
from metakv_cl.training.testing import TOY_MODEL_SHAPE, toy_setup, toy_task_specs, toy_trainer_kwargs  # noqa: E402


def make(strategy_cls, tmp_path, num_experiences=2, **kwargs):
    torch.manual_seed(0)
    benchmark, module = toy_setup(num_experiences)
    strategy = strategy_cls(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=8, **kwargs)
    return strategy, benchmark


def test_at_lambda_zero_the_evaluation_is_naives(tmp_path):
    naive, benchmark = make(Naive, tmp_path / "naive")
    expected = run_stream(naive, benchmark)
    knn, benchmark = make(KNNLM, tmp_path / "knn", interpolation=0.0)
    scored = []
    plugin = knn.plugin(plugins.KNNLM)
    score = plugin.score
    plugin.score = lambda model, batch: scored.append(1) or score(model, batch)  # the datastore path ran
    result = run_stream(knn, benchmark)
    assert scored and knn.module.eval_scorer is None  # set for the evaluations, cleared after
    # log(0 * p_kNN + 1 * p_LM) is exactly log_softmax of the logits, which cross-entropy scores as the logits
    assert result.matrix == expected.matrix and result.items == expected.items


def test_a_frozen_base_memorises_each_stored_experience(tmp_path):
    # test sets = the training documents: the held-out loss on what each experience stored
    tasks = [{**task, "test": task["train"]} for task in toy_task_specs(2)]
    stream = TaskStream(tasks=tasks, tokenizer="word-level", max_length=TOY_MODEL_SHAPE["n_positions"])
    benchmark = stream.build()
    torch.manual_seed(0)
    module = ContinualLMModule(tiny_gpt2(vocab_size=stream.vocab_size, **TOY_MODEL_SHAPE))
    before = {name: value.clone() for name, value in module.state_dict().items()}
    strategy = KNNLM(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), freeze_base=True, interpolation=0.5)
    result = run_stream(strategy, benchmark)

    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())  # no training phase
    plain, first, second = result.matrix  # row 0: the plain frozen model (empty datastore)
    assert first[0] < 0.3 * plain[0]  # experience 0 stored: memorised
    assert first[1] > 0.8 * plain[1]  # experience 1 not stored yet: still the frozen model's loss, about
    assert second[1] < 0.3 * plain[1] and second[0] < 0.3 * plain[0]  # experience 1 stored, 0 not forgotten
    contexts = [sum(len(item["input_ids"]) - 1 for item in experience.dataset) for experience in benchmark.train_stream]
    memory = strategy.plugin(plugins.KNNLM).memory
    assert len(memory.datastore) == sum(contexts) and len(memory.next_tokens) == sum(contexts)
    assert result.extra["knn_lm_entries"] == sum(contexts)
    assert result.extra["knn_lm_bytes"] == sum(contexts) * (TOY_MODEL_SHAPE["n_embd"] * 4 + 8)
    assert strategy.method_name == "knn-lm-frozen" and result.extra["trainable_params"] == 0


def test_the_datastore_grows_by_each_experiences_training_tokens(tmp_path):
    strategy, benchmark = make(KNNLM, tmp_path)
    memory = strategy.plugin(plugins.KNNLM).memory
    sizes = [len(memory.datastore)]
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[])
        sizes.append(len(strategy.plugin(plugins.KNNLM).memory.datastore))
        tokens = sum(len(item["input_ids"]) - 1 for item in experience.dataset)  # every token but a document's first
        assert sizes[-1] - sizes[-2] == tokens > 0


def test_resume_restores_the_datastore(tmp_path):
    strategy, benchmark = make(KNNLM, tmp_path)
    finished = run_stream(strategy, benchmark)
    stored = strategy.plugin(plugins.KNNLM).memory
    strategy, benchmark = make(KNNLM, tmp_path)
    restored = run_stream(strategy, benchmark, resume=True)  # nothing left to train
    memory = strategy.plugin(plugins.KNNLM).memory
    assert len(memory.datastore) == len(stored.datastore) > 0 and torch.equal(memory.next_tokens, stored.next_tokens)
    assert restored.matrix == finished.matrix
    strategy.eval(benchmark.test_stream)  # the restored datastore scores what the finished one did
    assert [strategy.eval_scores[j] for j in range(2)] == finished.matrix[-1]


def test_conflicts_and_bad_settings_are_refused(tmp_path):
    with pytest.raises(PluginConflictError, match="both hold the evaluation scorer"):
        make(ContinualStrategy, tmp_path, plugins=[plugins.KNNLM(), plugins.KNNLM(k=4)])
    # a frozen base owns the (empty) training schedule
    with pytest.raises(PluginConflictError, match="both hold the training schedule"):
        make(MetaKVConsolidation, tmp_path, plugins=[plugins.KNNLM(freeze_base=True)])
    with pytest.raises(ValueError, match=r"interpolation \(lambda\) must be in \[0, 1\], got 1.5"):
        make(KNNLM, tmp_path, interpolation=1.5)
    with pytest.raises(ValueError, match="window: 1 is not a token count"):
        plugins.KNNLM(window=1)


def test_classification_streams_are_refused(tmp_path):
    task = ClassificationTask("s", train=[("good film", "positive"), ("bad film", "negative")],
                              test=[("good", "positive")], labels=["positive", "negative"])
    tokenizer = word_level_tokenizer(["good bad film Answer : positive negative"])
    benchmark = make_benchmark([task], tokenizer, max_length=16)
    module = ContinualLMModule(tiny_gpt2(vocab_size=len(tokenizer)))
    strategy = KNNLM(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="KNNLM scores language-modelling experiences only"):
        strategy.eval(benchmark.test_stream)
    with pytest.raises(ValueError, match="KNNLM scores language-modelling experiences only"):
        strategy.train(benchmark.train_stream[0], eval_streams=[])
