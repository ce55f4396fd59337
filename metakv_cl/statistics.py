"""Confidence intervals and p-values for continual-learning figures: paired bootstrap, Holm correction.

Uncertainty comes from two sources: the finite test sets (which items were drawn) and the
training seeds. :func:`paired_bootstrap` resamples both (Efron & Tibshirani 1993, *An
Introduction to the Bootstrap*: ch. 13 on percentile intervals, ch. 16 on tests): each of
``resamples`` rounds draws the seeds with replacement and, for every task, the test items with
replacement, and recomputes every cell of R from the per-item outcomes of the drawn items. The
test items of a task are the same for every seed (the data seed is fixed; the seed changes
training), so items and seeds are crossed factors: one item draw per task serves every drawn
seed. From the resampled R of each drawn seed the figures of
:func:`metakv_cl.metrics.continual_summary` (average, forgetting, BWT) are computed and averaged
over the drawn seeds, as the seed tables average them.

A comparison is paired: the method and its reference are resampled with the *same* seeds and
items, so the spread of their difference leaves out what both share (hard items, lucky seeds).
Intervals are percentile intervals; the two-sided p-value of a difference is twice the smaller
share of resampled differences on either side of 0 (the smallest level at which the percentile
interval excludes 0), with the usual +1 so that it is never 0. :func:`holm` adjusts a family of
p-values (Holm 1979, "A simple sequentially rejective multiple test procedure").

Forgetting takes a maximum over earlier rows, and resampling noise raises a maximum: for a run that
barely forgets, its interval can lie above the point estimate. Read it as "how much forgetting the
test items cannot rule out", not as a centred error bar.

The per-item outcomes come from :attr:`metakv_cl.report.MethodResult.items`: for accuracy the
predicted and gold choice of each item (a cell is correct / items), for loss the summed NLL and
token count of each item (a cell is summed NLL / tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from metakv_cl.report import MethodResult

__all__ = ["BOOTSTRAP_FIGURES", "Interval", "ItemScores", "item_scores", "mean_interval", "paired_bootstrap", "holm",
           "intervals_json"]

# The figures the bootstrap gives intervals for, in display order.
BOOTSTRAP_FIGURES = ("average", "forgetting", "bwt")

# Resamples whose item draws are counted at once: keeps the draws and counts in the CPU cache.
_CHUNK = 1000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile interval (and a p-value for a difference).

    Attributes:
        estimate: the figure on the observed data (mean over seeds).
        low, high: the interval's bounds.
        p_value: two-sided bootstrap p-value of "the difference is 0" (differences only).
    """

    estimate: float
    low: float
    high: float
    p_value: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class ItemScores:
    """One method's per-item outcomes over seeds, as the bootstrap reads them.

    Cell R[i][j] of seed s is ``numerators[j][s, i].sum() / denominators[j][s].sum()``.

    Attributes:
        numerators: one ``[seeds, rows, items]`` array per task (rows of R, row 0 first): 0/1
            correctness for accuracies, summed NLL per item for losses.
        denominators: one ``[seeds, items]`` array per task: 1 per item for accuracies, its token
            count for losses.
        higher_is_better: True for accuracies, False for losses.
    """

    numerators: list[np.ndarray]
    denominators: list[np.ndarray]
    higher_is_better: bool

    @property
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        """(seeds, rows, items per task): what a paired reference must match."""
        first = self.numerators[0]
        return first.shape[0], first.shape[1], tuple(n.shape[2] for n in self.numerators)


def item_scores(runs: Sequence["MethodResult"]) -> ItemScores:
    """The :class:`ItemScores` of one method's runs, one run per seed.

    Args:
        runs: the method's results (same method, stream and number of rows), each with ``items``.

    Returns:
        Their per-item outcomes as arrays.

    Raises:
        ValueError: no runs, a run without per-item outcomes, or runs of unequal shape.
    """
    if not runs:
        raise ValueError("item_scores needs at least one run")
    missing = [run.method for run in runs if run.items is None]
    if missing:
        raise ValueError(f"{missing[0]}: the result has no per-item outcomes (it was run before they were recorded)")
    first = runs[0]
    numerators, denominators = [], []
    for task in range(len(first.experience_names)):
        try:
            if first.higher_is_better:
                gold = np.array([run.items["gold"][task] for run in runs])
                predicted = np.array([[row[task] for row in run.items["predicted"]] for run in runs])
                numerators.append((predicted == gold[:, None, :]).astype(np.float64))
                denominators.append(np.ones(gold.shape))
            else:
                numerators.append(np.array([[row[task] for row in run.items["nll"]] for run in runs], dtype=np.float64))
                denominators.append(np.array([run.items["tokens"][task] for run in runs], dtype=np.float64))
        except ValueError:  # numpy refuses ragged nesting
            raise ValueError(
                f"{first.method}: the runs differ in rows or in the test items of task "
                f"{first.experience_names[task]!r}; the bootstrap needs the same test items and rows in every seed"
            ) from None
    return ItemScores(numerators, denominators, first.higher_is_better)


def paired_bootstrap(
    method: ItemScores,
    reference: ItemScores | None = None,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Interval | None]]:
    """Bootstrap intervals of average, forgetting and BWT, and of their differences to a reference.

    Args:
        method: the method's per-item outcomes.
        reference: the reference method's, resampled with the same seeds and items (same seeds,
            rows and test items required).
        resamples: bootstrap rounds.
        confidence: interval coverage, e.g. 0.95.
        seed: seed of the resampling (equal seeds give equal results).

    Returns:
        ``{"method": {figure: Interval}}``, and with a reference also ``"reference"`` and
        ``"difference"`` (method minus reference, with ``p_value``). A figure undefined for the
        run (forgetting and BWT before a second experience is trained) is None.

    Raises:
        ValueError: bad ``resamples`` or ``confidence``, or a reference of another shape or score.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scored = [method]
    if reference is not None:
        if (reference.shape, reference.higher_is_better) != (method.shape, method.higher_is_better):
            raise ValueError(
                f"the reference (seeds, rows, items per task) = {reference.shape} does not pair with the method's "
                f"{method.shape}, or one is scored by accuracy and the other by loss"
            )
        scored.append(reference)
    rng = np.random.default_rng(seed)
    num_seeds, num_rows, items = method.shape
    trained = num_rows - 1  # k: the figures read row k and the k trained tasks' columns
    seed_draws = rng.integers(0, num_seeds, size=(resamples, 1, num_seeds))
    sign = 1.0 if method.higher_is_better else -1.0
    # per figure: the sum of the tasks' terms, [resamples or 1, methods, seeds]
    resampled: dict[str, Any] = dict.fromkeys(BOOTSTRAP_FIGURES, 0.0)
    observed: dict[str, Any] = dict.fromkeys(BOOTSTRAP_FIGURES, 0.0)
    for task in range(trained):
        num_items = items[task]
        numerators = np.concatenate([s.numerators[task].reshape(-1, num_items) for s in scored]).T
        denominators = np.concatenate([s.denominators[task] for s in scored]).T
        # float32 halves the time of the resampled sums; their rounding is far below any interval's width
        for sums, weights, dtype in ((resampled, _item_counts(rng, resamples, num_items), np.float32),
                                     (observed, np.ones((1, num_items)), np.float64)):
            top = (weights @ numerators.astype(dtype)).reshape(-1, len(scored), num_seeds, num_rows)
            bottom = (weights @ denominators.astype(dtype)).reshape(-1, len(scored), num_seeds, 1)
            for figure, term in _task_terms(top / bottom, task, trained, sign).items():
                sums[figure] = sums[figure] + term
    names = ["method", "reference"][: len(scored)]
    terms = {"average": trained, "forgetting": trained - 1, "bwt": trained - 1}
    samples, estimates = {}, {}
    for figure, count in terms.items():
        if count < 1:
            samples[figure] = estimates[figure] = None
            continue
        # a resample's figure: the mean over its drawn seeds, as the seed tables average seeds
        samples[figure] = np.take_along_axis(resampled[figure] / count, seed_draws, axis=2).mean(-1)
        estimates[figure] = (observed[figure] / count).mean(-1)[0]
    result: dict[str, dict[str, Interval | None]] = {
        name: {figure: _interval(_column(estimates[figure], m), _column(samples[figure], m), confidence)
               for figure in BOOTSTRAP_FIGURES} for m, name in enumerate(names)
    }
    if reference is not None:
        result["difference"] = {
            figure: None if samples[figure] is None else _interval(
                estimates[figure][0] - estimates[figure][1],
                samples[figure][:, 0] - samples[figure][:, 1], confidence, with_p_value=True)
            for figure in BOOTSTRAP_FIGURES
        }
    return result


def _column(values: np.ndarray | None, index: int) -> np.ndarray | None:
    return None if values is None else values[..., index]


def _item_counts(rng: np.random.Generator, resamples: int, num_items: int) -> np.ndarray:
    """How often each item is drawn in each resample: ``[resamples, items]`` (float32), rows summing to ``items``."""
    counts = np.empty((resamples, num_items), dtype=np.float32)
    offsets = num_items * np.arange(_CHUNK)[:, None]
    index_type = np.min_scalar_type(num_items - 1)  # the narrowest draws are the fastest
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        draws = rng.integers(0, num_items, size=(size, num_items), dtype=index_type)
        flat = (offsets[:size] + draws).ravel()
        counts[start:start + size] = np.bincount(flat, minlength=flat.size).reshape(size, num_items)
    return counts


def _task_terms(cells: np.ndarray, task: int, trained: int, sign: float) -> dict[str, np.ndarray]:
    """One task's terms of average, forgetting and BWT (the definitions of :func:`continual_summary`).

    Args:
        cells: the task's column of R, rows last (``[..., rows]``).
        task: its 0-based index j.
        trained: k, the last row.
        sign: 1 for accuracies, -1 for losses (forgetting and BWT are oriented as gains).

    Returns:
        ``average``: R[k][j]; for j < k - 1 also ``forgetting``: max over 1 <= l < k of the gain
        in row l minus the gain in row k, and ``bwt``: gain in row k minus gain in row j + 1.
    """
    terms = {"average": cells[..., trained]}
    if task < trained - 1:
        gain = sign * cells
        terms["forgetting"] = gain[..., 1:trained].max(-1) - gain[..., trained]
        terms["bwt"] = gain[..., trained] - gain[..., task + 1]
    return terms


def _interval(estimate: np.ndarray | None, samples: np.ndarray | None, confidence: float,
              with_p_value: bool = False) -> Interval | None:
    if samples is None:
        return None
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    p_value = None
    if with_p_value:
        below, above = (samples <= 0).sum(), (samples >= 0).sum()
        p_value = min(1.0, 2 * (1 + min(below, above)) / (len(samples) + 1))
    return Interval(float(estimate), float(low), float(high), p_value)


def mean_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """The mean of some per-item scores with its percentile bootstrap interval (items drawn with replacement).

    Args:
        values: the per-item scores (at least one).
        confidence: the interval's coverage, in (0, 1).
        resamples: bootstrap rounds.
        seed: the resampling seed.

    Returns:
        The mean and its interval (no p-value).

    Raises:
        ValueError: no values, or a confidence outside (0, 1).
    """
    if len(values) == 0:
        raise ValueError("mean_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    items = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(items), size=(resamples, len(items)))
    means = items[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(items.mean()), float(low), float(high))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values of a family of tests (Holm 1979).

    The i-th smallest of m p-values is multiplied by m - i + 1 (i from 1), made non-decreasing in
    that order and capped at 1; rejecting where the adjusted p-value is below alpha controls the
    family-wise error rate at alpha.

    Args:
        p_values: the family's p-values; None entries (undefined tests) are left out of the family.

    Returns:
        The adjusted p-values in the input order (None where the input is None).

    Raises:
        ValueError: a p-value outside [0, 1].
    """
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    bad = [p for p, _ in present if not 0 <= p <= 1]
    if bad:
        raise ValueError(f"p-values must lie in [0, 1], got {bad[0]}")
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def intervals_json(result: dict[str, dict[str, Interval | None]]) -> dict[str, Any]:
    """:func:`paired_bootstrap` output as plain JSON values."""
    return {name: {figure: None if interval is None else interval.to_json() for figure, interval in figures.items()}
            for name, figures in result.items()}
