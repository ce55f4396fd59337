"""Continual-learning metrics against hand-computed matrices, DDP reduction, Avalanche plugin."""

import io
import math
from types import SimpleNamespace

import pytest
import torch

from metakv_cl.metrics import ContinualMatrixPluginMetric, continual_summary

# Accuracies, 3 experiences. Row 0 = before training, row i = after training experience i.
ACCURACY = [
    [0.1, 0.2, 0.3],
    [0.9, 0.3, 0.2],
    [0.6, 0.8, 0.4],
    [0.5, 0.7, 0.9],
]
# average    = (0.5 + 0.7 + 0.9) / 3                                   = 0.7
# forgetting = ((max(0.9, 0.6) - 0.5) + (max(0.3, 0.8) - 0.7)) / 2      = (0.4 + 0.1) / 2 = 0.25
# bwt        = ((0.5 - 0.9) + (0.7 - 0.8)) / 2                          = -0.25
# fwt        = ((R[1][2] - R[0][2]) + (R[2][3] - R[0][3])) / 2
#            = ((0.3 - 0.2) + (0.4 - 0.3)) / 2                          = 0.1

# Mean token losses (nats), 3 experiences; lower is better.
LOSS = [
    [4.0, 4.0, 4.0],
    [2.0, 3.5, 3.8],
    [2.5, 1.5, 3.0],
    [3.0, 2.0, 1.0],
]
# average    = (3.0 + 2.0 + 1.0) / 3 = 2.0, perplexity = exp(2.0)
# forgetting (positive = the loss rose above its best earlier value):
#   exp 1: 3.0 - min(2.0, 2.5) = 1.0 ; exp 2: 2.0 - min(3.5, 1.5) = 0.5   -> 0.75
# bwt (positive = later training lowered the loss): (2.0 - 3.0) + (1.5 - 2.0) -> -1.5 / 2 = -0.75
# fwt (positive = earlier training lowered the loss before training):
#   (4.0 - 3.5) + (4.0 - 3.0) -> 1.5 / 2 = 0.75


def test_accuracy_matrix_by_hand():
    summary = continual_summary(ACCURACY, higher_is_better=True)
    assert summary["average"] == pytest.approx(0.7)
    assert summary["forgetting"] == pytest.approx(0.25)
    assert summary["forgetting_per_experience"] == pytest.approx([0.4, 0.1])
    assert summary["bwt"] == pytest.approx(-0.25)
    assert summary["bwt_per_experience"] == pytest.approx([-0.4, -0.1])
    assert summary["fwt"] == pytest.approx(0.1)
    assert summary["num_trained"] == 3
    assert "perplexity" not in summary


def test_loss_matrix_by_hand_with_oriented_signs():
    summary = continual_summary(LOSS, higher_is_better=False)
    assert summary["average"] == pytest.approx(2.0)
    assert summary["perplexity"] == pytest.approx(math.exp(2.0))
    assert summary["forgetting"] == pytest.approx(0.75)
    assert summary["forgetting_per_experience"] == pytest.approx([1.0, 0.5])
    assert summary["bwt"] == pytest.approx(-0.75)
    assert summary["fwt"] == pytest.approx(0.75)
    assert summary["fwt_per_experience"] == pytest.approx([0.5, 1.0])


def test_partial_matrix_and_unmeasured_cells():
    after_first = continual_summary(ACCURACY[:2], higher_is_better=True)
    assert after_first["average"] == pytest.approx(0.9)  # only experience 1 is trained
    assert after_first["forgetting"] is None and after_first["bwt"] is None
    assert after_first["fwt"] == pytest.approx(0.3 - 0.2)
    no_row_zero = [[None, None, None]] + ACCURACY[1:]
    summary = continual_summary(no_row_zero, higher_is_better=True)
    assert summary["fwt"] is None
    assert summary["forgetting"] == pytest.approx(0.25)
    tensor_summary = continual_summary(torch.tensor(LOSS), higher_is_better=False)
    assert tensor_summary["bwt"] == pytest.approx(-0.75)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [([], "empty"), ([[1.0, 2.0], [1.0]], "ragged"), ([[1.0]] * 3, "at most 2"), (torch.zeros(3), "2-D")],
)
def test_summary_rejects_bad_matrices(matrix, message):
    with pytest.raises(ValueError, match=message):
        continual_summary(matrix, higher_is_better=True)


class _FakeExperience(SimpleNamespace):
    def logging(self):  # EvaluationPlugin switches experiences to logging mode
        return self


def _run_stream(plugin_callback, matrix):
    """Replay `matrix` through the strategy contract: one eval pass per row."""
    stream = SimpleNamespace(name="test")
    strategy = SimpleNamespace(eval_scores={}, trained_experiences=0, clock=SimpleNamespace(train_iterations=0),
                               experience=None, is_eval=True)
    emitted = []
    for row, scores in enumerate(matrix):
        strategy.trained_experiences = row
        strategy.clock.train_iterations = 10 * row
        strategy.eval_scores = {}
        for exp_id, score in enumerate(scores):
            strategy.experience = _FakeExperience(current_experience=exp_id, origin_stream=stream)
            strategy.eval_scores[exp_id] = score
            plugin_callback("after_eval_exp", strategy)
        emitted.append(plugin_callback("after_eval", strategy))
    return emitted


def test_plugin_metric_emits_figures_after_each_eval():
    plugin = ContinualMatrixPluginMetric(higher_is_better=False)
    emitted = _run_stream(lambda hook, strategy: getattr(plugin, hook)(strategy), LOSS)
    first = {value.name: value.value for value in emitted[0]}
    assert first == {}  # before any training nothing is defined yet
    last = {value.name: value.value for value in emitted[-1]}
    assert last["CL_Average/eval_phase/test_stream"] == pytest.approx(2.0)
    assert last["CL_Forgetting/eval_phase/test_stream"] == pytest.approx(0.75)
    assert last["CL_BWT/eval_phase/test_stream"] == pytest.approx(-0.75)
    assert last["CL_FWT/eval_phase/test_stream"] == pytest.approx(0.75)
    assert last["CL_Perplexity/eval_phase/test_stream"] == pytest.approx(math.exp(2.0))
    assert emitted[-1][0].x_plot == 30
    assert plugin.matrix == LOSS
    plugin.reset()
    assert plugin.result() == {}


def test_plugin_metric_through_avalanche_evaluation_plugin():
    from avalanche.logging import TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    plugin = ContinualMatrixPluginMetric(higher_is_better=True, name="Acc")
    log = io.StringIO()
    evaluator = EvaluationPlugin(plugin, loggers=[TextLogger(log)], collect_all=True)
    _run_stream(lambda hook, strategy: getattr(evaluator, hook)(strategy), ACCURACY)
    assert "Acc_BWT/eval_phase/test_stream = -0.2500" in log.getvalue()
    history = evaluator.get_all_metrics()
    xs, forgetting = history["Acc_Forgetting/eval_phase/test_stream"]
    assert xs == [20, 30]  # defined from the second trained experience on
    assert forgetting == pytest.approx([0.9 - 0.6, 0.25])
    assert evaluator.get_last_metrics()["Acc_Average/eval_phase/test_stream"] == pytest.approx(0.7)


def test_plugin_metric_names_a_missing_score():
    plugin = ContinualMatrixPluginMetric()
    strategy = SimpleNamespace(eval_scores={0: 1.0}, trained_experiences=1,
                               experience=SimpleNamespace(current_experience=2))
    with pytest.raises(KeyError, match="experience 2"):
        plugin.after_eval_exp(strategy)


def test_item_records_come_back_in_dataset_index_order():
    from metakv_cl.metrics import ItemRecords

    records = ItemRecords("predicted", "gold")
    # the shares of two DDP ranks, as UnrepeatedDistributedSampler deals them out (rank 1's first)
    records.update(torch.tensor([1, 3]), predicted=torch.tensor([5, 7]), gold=torch.tensor([1, 1]))
    records.update(torch.tensor([0, 2, 4]), predicted=torch.tensor([4, 6, 8]), gold=torch.tensor([0, 0, 0]))
    assert records.compute() == {"predicted": [4, 5, 6, 7, 8], "gold": [0, 1, 0, 1, 0]}
    with pytest.raises(ValueError, match=r"expects the fields \['predicted', 'gold'\], got \['nll'\]"):
        records.update(torch.tensor([5]), nll=torch.tensor([1.0]))
