"""Paired bootstrap intervals, p-values and Holm's correction (metakv_cl/statistics.py)."""

import numpy as np
import pytest

from metakv_cl.metrics import continual_summary
from metakv_cl.statistics import ItemScores, holm, paired_bootstrap

SEEDS, TASKS = 3, 3


def accuracy_scores(rates, items=200, seed=0):
    """Random 0/1 outcomes of SEEDS seeds: task j is right with probability rates[i][j] in row i."""
    rng = np.random.default_rng(seed)
    rates = np.asarray(rates)[None, :, :, None]  # [1, rows, tasks, 1]
    correct = (rng.random((SEEDS, rates.shape[1], TASKS, items)) < rates).astype(float)
    return ItemScores([correct[:, :, j] for j in range(TASKS)], [np.ones((SEEDS, items))] * TASKS, True)


# row 0 before training, then one row per task: learns each task, forgets some of the earlier ones
LEARNER = [[0.5, 0.5, 0.5], [0.9, 0.5, 0.5], [0.7, 0.9, 0.5], [0.6, 0.8, 0.9]]
CHANCE = [[0.5] * TASKS] * (TASKS + 1)


def test_estimates_are_the_summary_figures_averaged_over_seeds():
    rng = np.random.default_rng(0)
    losses = ItemScores([rng.random((SEEDS, TASKS + 1, 30)) * 9 for _ in range(TASKS)],  # summed NLL per item
                        [rng.integers(1, 9, (SEEDS, 30)).astype(float) for _ in range(TASKS)], False)  # tokens
    for scores in (accuracy_scores(LEARNER, items=30), losses):
        result = paired_bootstrap(scores, resamples=50)["method"]
        summaries = []
        for s in range(SEEDS):
            matrix = [[scores.numerators[j][s, i].sum() / scores.denominators[j][s].sum() for j in range(TASKS)]
                      for i in range(TASKS + 1)]
            summaries.append(continual_summary(matrix, scores.higher_is_better))
        for figure in ("average", "forgetting", "bwt"):
            assert result[figure].estimate == pytest.approx(np.mean([summary[figure] for summary in summaries]))
            assert result[figure].low <= result[figure].high


def test_a_method_against_an_equal_one_contains_zero_and_against_a_clearly_worse_one_excludes_it():
    method = accuracy_scores(LEARNER, seed=0)
    equal = accuracy_scores(LEARNER, seed=1)  # same success rates, other items and outcomes
    worse = accuracy_scores(CHANCE, seed=2)
    tie = paired_bootstrap(method, equal, resamples=2000)["difference"]["average"]
    assert tie.low < 0 < tie.high and tie.p_value > 0.05
    gap = paired_bootstrap(method, worse, resamples=2000)["difference"]["average"]
    assert 0 < gap.low and gap.estimate == pytest.approx(0.8 - 0.5, abs=0.05)
    assert gap.p_value == pytest.approx(2 / 2001)  # no resample reaches 0: the smallest p-value
    same = paired_bootstrap(method, method, resamples=200)["difference"]
    assert all((d.low, d.high, d.p_value) == (0.0, 0.0, 1.0) for d in same.values())


def test_intervals_shrink_with_more_items():
    def width(items):
        interval = paired_bootstrap(accuracy_scores(LEARNER, items=items), resamples=2000)["method"]["average"]
        return interval.high - interval.low

    assert width(800) < 0.6 * width(100)


def test_resampling_is_deterministic_given_its_seed():
    scores = accuracy_scores(LEARNER, items=50)
    first = paired_bootstrap(scores, resamples=300, seed=3)
    assert paired_bootstrap(scores, resamples=300, seed=3) == first
    assert paired_bootstrap(scores, resamples=300, seed=4) != first


def test_forgetting_and_bwt_need_two_trained_experiences():
    full = accuracy_scores(LEARNER)
    scores = ItemScores([n[:, :2] for n in full.numerators], full.denominators, True)  # rows 0 and 1 only
    result = paired_bootstrap(scores, scores, resamples=10)
    assert result["method"]["forgetting"] is None and result["difference"]["bwt"] is None
    assert result["method"]["average"] is not None


def test_bad_input_is_refused():
    scores = accuracy_scores(LEARNER, items=20)
    with pytest.raises(ValueError, match="does not pair"):
        paired_bootstrap(scores, accuracy_scores(LEARNER, items=21))
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_bootstrap(scores, confidence=95)
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        paired_bootstrap(scores, resamples=0)


def test_holm_adjusts_a_hand_computed_family():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.6]) == pytest.approx([1.0, None, 1.0]) and holm([0.5, None, 0.6])[1] is None
    with pytest.raises(ValueError, match="p-values must lie in"):
        holm([1.5])


def test_mean_interval_brackets_the_mean_of_per_item_scores():
    from metakv_cl.statistics import mean_interval

    interval = mean_interval([1.0, 0.0, 1.0, 1.0, 0.5], seed=3)
    assert interval.estimate == pytest.approx(0.7)
    assert 0.0 <= interval.low < 0.7 < interval.high <= 1.0
    assert interval == mean_interval([1.0, 0.0, 1.0, 1.0, 0.5], seed=3)
    assert mean_interval([0.25, 0.25]) == mean_interval([0.25])  # no spread, no width
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0], confidence=1.0)
