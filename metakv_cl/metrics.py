"""Continual-learning metrics over the score matrix R.

``R`` has one row per point in training and one column per experience: row 0 is before any
training, row ``i`` (1-based) is after training experience ``i``, and ``R[i][j]`` is the
score on experience ``j`` (column ``j - 1`` in 0-based Python indexing) at that point. A
score is an accuracy (higher is better) or a mean per-token loss in nats (lower is better).

Figures (``T`` = experiences, ``k`` = experiences trained so far = last row index; for a
finished run ``k = T``; the formulas are written in 1-based experience numbers):

- ``average`` = mean of R[k][j] over the trained experiences j <= k (Chaudhry et al. 2018's
  average accuracy A_k; for a finished run the mean of the last row).
- ``forgetting`` (Chaudhry et al. 2018) = mean over j < k of
  max_{1<=l<k} R[l][j] - R[k][j].
- ``bwt`` (backward transfer, GEM, Lopez-Paz & Ranzato 2017) = mean over j < k of
  R[k][j] - R[j][j].
- ``fwt`` (forward transfer, GEM) = mean over 2 <= j <= min(k + 1, T) of R[j-1][j] - R[0][j]
  (the score on an experience just before it is trained, against the untrained model).

Sign conventions: every figure is *oriented* so that it means the same for accuracies and
losses. For a loss (``higher_is_better=False``) the differences are negated before taking
means, so in both cases

- ``forgetting > 0`` means the model got worse on earlier experiences (for a loss:
  R[k][j] - min_{l<k} R[l][j], the rise of the loss over its best value);
- ``bwt > 0`` means later training *improved* earlier experiences (for a loss:
  R[j][j] - R[k][j]); ``bwt < 0`` is forgetting;
- ``fwt > 0`` means earlier training helped an experience before it was trained (for a
  loss: R[0][j] - R[j-1][j]).

For a loss matrix the summary also has ``perplexity = exp(average)``: losses are averaged
first and the mean is exponentiated (the mean of per-experience perplexities would
overweight the worst experience). Cells that were not measured are ``None`` or NaN and are
left out of the means; a figure with no measured term is ``None`` (e.g. forgetting after
the first experience).

The engine fills R one cell per evaluation, from scores already reduced over DDP ranks (the
module's torchmetrics states); :class:`ContinualMatrixPluginMetric` feeds the figures to
Avalanche's ``EvaluationPlugin`` and loggers, and :class:`ItemRecords` gathers each test
item's outcome from every rank.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from torchmetrics import Metric

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

__all__ = [
    "SUMMARY_FIGURES",
    "continual_summary",
    "ContinualMatrixPluginMetric",
    "ItemRecords",
    "balanced_accuracy",
    "majority_rate",
]

# The scalar figures of a summary, in display order.
SUMMARY_FIGURES = ("average", "forgetting", "bwt", "fwt")

MatrixLike = Sequence[Sequence[float | None]] | torch.Tensor


def _as_float_rows(matrix: MatrixLike) -> list[list[float]]:
    """The matrix as rows of floats, NaN for unmeasured cells; validates its shape."""
    if isinstance(matrix, torch.Tensor):
        if matrix.dim() != 2:
            raise ValueError(f"the score matrix must be 2-D, got shape {tuple(matrix.shape)}")
        matrix = matrix.tolist()
    rows = [[math.nan if cell is None else float(cell) for cell in row] for row in matrix]
    if not rows or not rows[0]:
        raise ValueError("the score matrix is empty: it needs row 0 (before training) and one column per experience")
    num_experiences = len(rows[0])
    if any(len(row) != num_experiences for row in rows):
        raise ValueError(f"the score matrix is ragged: row lengths {[len(row) for row in rows]}")
    if len(rows) > num_experiences + 1:
        raise ValueError(
            f"the score matrix has {len(rows)} rows for {num_experiences} experiences; "
            f"at most {num_experiences + 1} (row 0 = before training, then one per experience)"
        )
    return rows


def _mean(values: list[float]) -> float | None:
    """Mean of the finite values, or None if there is none."""
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else None


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def continual_summary(matrix: MatrixLike, higher_is_better: bool) -> dict[str, Any]:
    """Average, forgetting, backward and forward transfer of a score matrix.

    Args:
        matrix: R as (k+1) x T rows (lists or a 2-D tensor), 0 <= k <= T: row 0 before any
            training, row i after training experience i. ``None``/NaN marks an unmeasured cell;
            trailing rows with no measured cell are ignored (k is the last measured row).
        higher_is_better: True for accuracies, False for losses (see the module docstring
            for the sign conventions).

    Returns:
        ``average``, ``forgetting``, ``bwt``, ``fwt`` (floats or None when undefined),
        ``forgetting_per_experience`` and ``bwt_per_experience`` (one entry per experience
        j < k), ``fwt_per_experience`` (one per experience 2..min(k+1, T)),
        ``num_trained`` (= k), and for losses ``perplexity`` (exp of ``average``).

    Raises:
        ValueError: if the matrix is empty, ragged or has more than T + 1 rows.
    """
    rows = _as_float_rows(matrix)
    num_experiences = len(rows[0])
    # Trailing rows with no measured cell are experiences not trained yet (pre-allocated rows).
    while len(rows) > 1 and all(math.isnan(cell) for cell in rows[-1]):
        rows.pop()
    trained = len(rows) - 1
    # Orient every score so that larger is better; all differences below are then "gains".
    sign = 1.0 if higher_is_better else -1.0
    gain = [[sign * cell for cell in row] for row in rows]

    forgetting_per_experience = []
    bwt_per_experience = []
    for j in range(trained - 1):  # 0-based column j is experience j + 1 < k
        earlier = [gain[l][j] for l in range(1, trained) if not math.isnan(gain[l][j])]
        best_earlier = max(earlier) if earlier else math.nan
        forgetting_per_experience.append(_finite_or_none(best_earlier - gain[trained][j]))
        bwt_per_experience.append(_finite_or_none(gain[trained][j] - gain[j + 1][j]))
    # Experience j (1-based, 2 <= j <= min(k+1, T)) just before training it: row j-1, column j-1.
    fwt_per_experience = [
        _finite_or_none(gain[j - 1][j - 1] - gain[0][j - 1]) for j in range(2, min(trained + 1, num_experiences) + 1)
    ]

    average = _mean(rows[trained][:trained]) if trained else None
    summary: dict[str, Any] = {
        "average": average,
        "forgetting": _mean([math.nan if v is None else v for v in forgetting_per_experience]),
        "bwt": _mean([math.nan if v is None else v for v in bwt_per_experience]),
        "fwt": _mean([math.nan if v is None else v for v in fwt_per_experience]),
        "forgetting_per_experience": forgetting_per_experience,
        "bwt_per_experience": bwt_per_experience,
        "fwt_per_experience": fwt_per_experience,
        "num_trained": trained,
    }
    if not higher_is_better:
        summary["perplexity"] = math.exp(average) if average is not None else None
    return summary


def balanced_accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Mean over the gold classes of the share of their items predicted right (recall per class).

    A predictor of one class scores 1 / (number of gold classes) however unbalanced the test set is.

    Args:
        predicted: predicted class per item.
        gold: gold class per item (the classes averaged over are those that occur here).

    Returns:
        The balanced accuracy in [0, 1].

    Raises:
        ValueError: empty or unequal-length inputs.
    """
    if not gold or len(predicted) != len(gold):
        raise ValueError(
            f"balanced_accuracy needs equally many predictions and gold labels, got {len(predicted)} and {len(gold)}"
        )
    recalls = []
    for label in sorted(set(gold)):
        members = [p for p, g in zip(predicted, gold) if g == label]
        recalls.append(sum(p == label for p in members) / len(members))
    return sum(recalls) / len(recalls)


def majority_rate(gold: Sequence[int]) -> float:
    """Share of the most frequent gold class: the accuracy of always predicting it.

    Raises:
        ValueError: no gold labels.
    """
    if not gold:
        raise ValueError("majority_rate needs at least one gold label")
    return max(gold.count(label) for label in set(gold)) / len(gold)


class ItemRecords(Metric):
    """Named per-item values with each item's dataset index, gathered from every DDP rank.

    Each rank adds the items it scored; ``compute`` concatenates all ranks' records
    (``dist_reduce_fx="cat"``) and sorts them by dataset index, so the result is in test-set
    order whichever rank scored which item.

    Args:
        fields: the value names, e.g. ``("predicted", "gold")``.
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, *fields: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fields = fields
        # float64 holds every index, class id and token count exactly, and NLL sums without rounding
        self.set_dtype(torch.float64)
        for name in ("index", *fields):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Add items.

        Args:
            index: ``[N]`` dataset indices of the items.
            **values: one ``[N]`` tensor per field.

        Raises:
            ValueError: if the fields are not exactly this metric's.
        """
        if set(values) != set(self.fields):
            raise ValueError(f"ItemRecords expects the fields {list(self.fields)}, got {sorted(values)}")
        for name, value in {"index": index, **values}.items():
            getattr(self, name).append(torch.as_tensor(value).detach().to(self.device, torch.float64).reshape(-1))

    def compute(self) -> dict[str, list[float]]:
        """Every field's values in dataset-index order (all ranks' items after a DDP sync)."""
        index = _concatenated(self.index)
        order = index.argsort()
        return {name: _concatenated(getattr(self, name))[order].tolist() for name in self.fields}


def _concatenated(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A list state as one tensor (torchmetrics leaves a synced list state as one tensor)."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.float64)


class ContinualMatrixPluginMetric(PluginMetric[dict]):
    """Exposes R and its figures to Avalanche's ``EvaluationPlugin`` and loggers.

    The strategy contract: during evaluation the strategy fills
    ``strategy.eval_scores[experience_id] = score`` (a float, already reduced over ranks)
    and keeps ``strategy.trained_experiences`` (how many experiences it has trained, i.e.
    the row of R). At ``after_eval_exp`` this metric records the score of the experience
    just evaluated; at ``after_eval`` it emits average, forgetting, BWT and FWT (and
    perplexity for losses) as ``MetricValue`` objects named
    ``"{name}_{Figure}/eval_phase/{stream}_stream"``. Figures that are not defined yet are
    not emitted.

    Args:
        higher_is_better: True for accuracies, False for losses.
        name: prefix of the emitted metric names.
    """

    def __init__(self, higher_is_better: bool = True, name: str = "CL") -> None:
        super().__init__()
        self.higher_is_better = higher_is_better
        self.name = name
        self._cells: dict[tuple[int, int], float] = {}

    def __str__(self) -> str:
        return self.name

    def reset(self) -> None:
        """Forget every recorded score."""
        self._cells.clear()

    @property
    def matrix(self) -> list[list[float]]:
        """R recorded so far: rows 0..last trained row, one column per evaluated experience (NaN = missing)."""
        if not self._cells:
            return []
        num_rows = max(row for row, _ in self._cells) + 1
        num_cols = max(col for _, col in self._cells) + 1
        return [[self._cells.get((row, col), math.nan) for col in range(num_cols)] for row in range(num_rows)]

    def result(self) -> dict[str, Any]:
        """``matrix`` and the :func:`continual_summary` figures; empty before any evaluation."""
        matrix = self.matrix
        if not matrix:
            return {}
        # Before the stream is fully evaluated there may be more rows than columns seen.
        num_cols = max(len(matrix[0]), len(matrix) - 1)
        padded = [row + [math.nan] * (num_cols - len(row)) for row in matrix]
        return {"matrix": matrix, **continual_summary(padded, self.higher_is_better)}

    def after_eval_exp(self, strategy: "SupervisedTemplate") -> None:
        super().after_eval_exp(strategy)
        experience_id = int(strategy.experience.current_experience)
        scores = getattr(strategy, "eval_scores", None)
        if scores is None or experience_id not in scores:
            raise KeyError(
                f"{type(self).__name__}: strategy.eval_scores has no score for experience {experience_id}; "
                "the strategy must fill eval_scores[experience_id] before after_eval_exp"
            )
        row = int(strategy.trained_experiences)
        self._cells[(row, experience_id)] = float(scores[experience_id])

    def after_eval(self, strategy: "SupervisedTemplate") -> list[MetricValue]:
        super().after_eval(strategy)
        summary = self.result()
        figures = [*SUMMARY_FIGURES, *(() if self.higher_is_better else ("perplexity",))]
        experience = getattr(strategy, "experience", None)
        stream = getattr(getattr(experience, "origin_stream", None), "name", "test")
        clock = getattr(strategy, "clock", None)
        x_plot = clock.train_iterations if clock is not None else int(strategy.trained_experiences)
        return [
            MetricValue(self, f"{self.name}_{_figure_title(figure)}/eval_phase/{stream}_stream", summary[figure], x_plot)
            for figure in figures
            if summary.get(figure) is not None
        ]


def _figure_title(figure: str) -> str:
    return figure.upper() if figure in ("bwt", "fwt") else figure.capitalize()
