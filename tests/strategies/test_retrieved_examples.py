"""Retrieval-augmented classification: each experience's labelled training items become in-context examples."""

import pytest
import torch

pytest.importorskip("faiss")

from metakv_cl.data.collate import IGNORE_INDEX  # noqa: E402
from metakv_cl.strategies import ContinualStrategy, MetaKVConsolidation, Naive, RetrievedExamples, plugins  # noqa: E402
from metakv_cl.strategies.plugins import PluginConflictError  # noqa: E402
from metakv_cl.strategies.plugins.retrieved_examples import fit_examples, with_context  # noqa: E402
from metakv_cl.training.runner import run_stream, warm_up  # noqa: E402
from metakv_cl.training.testing import toy_lookup_setup, toy_setup, toy_trainer_kwargs  # noqa: E402

# a warm-up that teaches the toy model to read an example: 25 epochs of 400 texts at lr 1e-2 copy every
# label (10 epochs do not)
WARMUP_TEXTS, WARMUP_EPOCHS = 400, 25


def make(strategy_cls, tmp_path, warmup_epochs=0, **kwargs):
    """A strategy on the toy lookup stream (2 experiences of 12 items), optionally after the warm-up."""
    torch.manual_seed(0)
    benchmark, module = toy_lookup_setup(2, warmup_texts=WARMUP_TEXTS if warmup_epochs else 0, lr=1e-2)
    if warmup_epochs:
        warm_up(module, benchmark, root_dir=tmp_path, epochs=warmup_epochs, trainer_kwargs=toy_trainer_kwargs(tmp_path),
                train_mb_size=16)
    strategy = strategy_cls(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=8, **kwargs)
    return strategy, benchmark


def spy_on(plugin, name):
    """Record every return value of one of the plugin's methods (the attribute is wrapped in place)."""
    calls, method = [], getattr(plugin, name)

    def recorded(*args, **kwargs):
        calls.append(method(*args, **kwargs))
        return calls[-1]

    setattr(plugin, name, recorded)
    return calls


def test_with_k_zero_the_evaluation_is_naives(tmp_path):
    naive, benchmark = make(Naive, tmp_path / "naive")
    expected = run_stream(naive, benchmark)
    strategy, benchmark = make(RetrievedExamples, tmp_path / "retrieval", k=0)
    augmented = spy_on(strategy.plugin(plugins.RetrievedExamples), "prepend_examples")
    result = run_stream(strategy, benchmark)
    assert augmented and strategy.module.eval_context is None  # set for the evaluations, cleared after
    assert result.score_name == "accuracy"
    assert result.matrix == expected.matrix and result.items == expected.items


def test_a_frozen_base_reads_the_near_duplicate_training_item(tmp_path):
    accuracies = {}
    for k in (0, 1):
        strategy, benchmark = make(RetrievedExamples, tmp_path, warmup_epochs=WARMUP_EPOCHS, k=k, freeze_base=True)
        before = {name: value.clone() for name, value in strategy.module.state_dict().items()}
        result = run_stream(strategy, benchmark)
        assert all(torch.equal(before[name], value) for name, value in strategy.module.state_dict().items())
        accuracies[k] = result.matrix[-1]
        # the per-item outcomes (recorded by batch index) are what the accuracies count
        last = result.items["predicted"][-1]
        assert [sum(p == g for p, g in zip(predicted, gold)) / len(gold)
                for predicted, gold in zip(last, result.items["gold"])] == result.matrix[-1]
    assert strategy.method_name == "retrieval-icl-frozen" and result.extra["trainable_params"] == 0
    # labels are drawn at random: without the stored item the model guesses (about 1 in 3)
    mean = {k: sum(row) / len(row) for k, row in accuracies.items()}
    assert mean[1] > mean[0] + 0.3 and min(accuracies[1]) > 0.5, accuracies


def test_the_datastore_grows_by_each_experiences_training_items(tmp_path):
    strategy, benchmark = make(RetrievedExamples, tmp_path)
    plugin = strategy.plugin(plugins.RetrievedExamples)
    sizes, tokens = [len(plugin.store)], 0
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[])
        sizes.append(len(plugin.store))
        tokens += sum(len(item["input_ids"]) for item in experience.dataset)
        assert sizes[-1] - sizes[-2] == len(experience.dataset) > 0
    hidden = strategy.module.model.get_output_embeddings().weight.shape[-1]
    assert plugin.store.nbytes == sizes[-1] * (hidden * 4 + 2 * 8) + tokens * 8  # keys, two lengths, token ids
    extra = plugin.report_extra(strategy)
    assert extra == {"retrieval_icl_entries": sizes[-1], "retrieval_icl_bytes": plugin.store.nbytes}


def test_retrieval_returns_training_items_only(tmp_path):
    strategy, benchmark = make(RetrievedExamples, tmp_path, k=3)
    retrieved = spy_on(strategy.plugin(plugins.RetrievedExamples).store, "search")
    run_stream(strategy, benchmark)
    training = {tuple(item["input_ids"].tolist())
                for experience in benchmark.train_stream for item in experience.dataset}
    gold_rows = [(item["choice_input_ids"][item["target"]], item["choice_attention_mask"][item["target"]])
                 for experience in benchmark.test_stream for item in experience.dataset]
    tests = {tuple(ids[mask.bool()].tolist()) for ids, mask in gold_rows}  # each test item, its gold label after it
    examples = [tuple(example.tolist()) for batch in retrieved for item in batch for example in item]
    assert examples and set(examples) <= training and not set(examples) & tests
    assert all(len(item) == 3 for batch in retrieved for item in batch)


def test_a_run_is_deterministic(tmp_path):
    results, stores = [], []
    for run in range(2):
        strategy, benchmark = make(RetrievedExamples, tmp_path / str(run), k=2)
        results.append(run_stream(strategy, benchmark))
        stores.append(strategy.plugin(plugins.RetrievedExamples).store.state_dict())
    assert results[0].matrix == results[1].matrix and results[0].items == results[1].items
    assert all(torch.equal(stores[0][key], stores[1][key]) for key in ("tokens", "lengths", "prompt_lengths"))
    assert torch.equal(stores[0]["datastore"]["index"], stores[1]["datastore"]["index"])


def test_examples_are_dropped_whole_from_the_farthest_and_the_item_never(tmp_path):
    near, far = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])
    assert fit_examples([near, far], 100).tolist() == [4, 5, 6, 7, 1, 2, 3]  # nearest last, next to the prompt
    assert fit_examples([near, far], 5).tolist() == [1, 2, 3]  # the farthest dropped whole, not cut to [6, 7]
    assert fit_examples([near, far], 2).tolist() == [2, 3]  # the nearest alone is too long: its end stays
    assert fit_examples([near, far], 0).numel() == 0 and fit_examples([], 5).numel() == 0
    ids = torch.tensor([[[9, 8, 30, 0], [9, 8, 31, 32]]])  # one item, two candidates, the first one padded
    labels = torch.tensor([[[IGNORE_INDEX, IGNORE_INDEX, 30, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 31, 32]]])
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1]]])
    new_ids, new_labels, new_mask = with_context(ids, labels, mask, [torch.tensor([5, 6])])
    assert new_ids.tolist() == [[[5, 6, 9, 8, 30, 0], [5, 6, 9, 8, 31, 32]]]
    assert (new_labels[..., :2] == IGNORE_INDEX).all() and torch.equal(new_labels[..., 2:], labels)
    assert new_mask.tolist() == [[[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]]
    assert all(torch.equal(a, b) for a, b in zip(with_context(ids, labels, mask, [torch.empty(0, dtype=torch.long)]),
                                                  (ids, labels, mask)))

    # on the stream: rows of at most max_length tokens, each ending with the item's own row
    strategy, benchmark = make(RetrievedExamples, tmp_path, k=4, max_length=24)
    plugin = strategy.plugin(plugins.RetrievedExamples)
    augmented = spy_on(plugin, "prepend_examples")
    run_stream(strategy, benchmark)
    batch = augmented[-1]
    lengths = batch["choice_attention_mask"].sum(dim=-1)
    assert int(lengths.max()) == 21  # of 4 examples of 7 tokens, 2 fit whole beside an item of 7 (3 would make 28)
    item = benchmark.test_stream[1].dataset[0]
    own = item["choice_input_ids"][0][item["choice_attention_mask"][0].bool()]
    end = int(lengths[0, 0])  # the row ends with the item's own prompt and label
    assert torch.equal(batch["choice_input_ids"][0, 0, end - len(own) : end], own)


def test_conflicts_bad_settings_and_language_modelling_are_refused(tmp_path):
    with pytest.raises(PluginConflictError, match="both hold the evaluation context"):
        make(ContinualStrategy, tmp_path, plugins=[plugins.RetrievedExamples(), plugins.RetrievedExamples(k=1)])
    with pytest.raises(PluginConflictError, match="both hold the training schedule"):
        make(MetaKVConsolidation, tmp_path, plugins=[plugins.RetrievedExamples(freeze_base=True)])
    with pytest.raises(ValueError, match="k: -1 is not an integer >= 0"):
        plugins.RetrievedExamples(k=-1)
    with pytest.raises(ValueError, match="max_length: 1 is not an integer >= 2"):
        plugins.RetrievedExamples(max_length=1)
    with pytest.raises(ValueError, match="RetrievedExamples: max_length 65 exceeds the model's 64 positions"):
        make(RetrievedExamples, tmp_path, max_length=65)
    benchmark, module = toy_setup(2)
    strategy = RetrievedExamples(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path))
    message = "RetrievedExamples puts labelled training items before classification prompts only"
    with pytest.raises(ValueError, match=message):
        strategy.eval(benchmark.test_stream)
    with pytest.raises(ValueError, match=message):
        strategy.train(benchmark.train_stream[0], eval_streams=[])
