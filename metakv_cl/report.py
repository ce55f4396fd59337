"""End-of-run reports: the score matrix of each method, its figures, tables and plots.

A run produces one :class:`MethodResult` per strategy (its matrix R, see
:mod:`metakv_cl.metrics` for the definitions and sign conventions). :func:`write_report`
writes, into one folder:

- ``report.json``: every method's matrix, summary figures and extra facts (wall time,
  peak memory, trainable parameters, seed, ...), and where they were recorded its per-item
  outcomes, the bootstrap intervals of its figures (:mod:`metakv_cl.statistics`), its
  per-experience rows and the experiences it did not learn, and where generative exact match was
  recorded its matrix and summary (``exact_match``);
- ``report.md``: the side-by-side table (intervals and "did not learn" where per-item outcomes
  exist, exact match where recorded), the per-experience table of accuracy results and each
  method's matrix (and exact-match matrix);
- ``heatmap_<method>.png``: R as an annotated heatmap (the just-trained cells outlined);
- ``curves_<method>.png``: each experience's score across the stream;
- ``forgetting.png``: forgetting per experience and on average, one bar per method;
- ``routing_<method>.png``: for a method with an addressed Meta-KV bank (its ``extra`` has
  ``slot_read_weights``), the mean read weights of each test experience over the slots.

:func:`aggregate_seeds` turns several seeds' results into a mean +- std table, and
:func:`write_seed_report` writes a stream's multi-seed report (table, JSON, mean-R heatmaps,
forgetting plot, bootstrap intervals over seeds and test items, differences to a reference
with Holm-adjusted p-values, and where the methods under test do not beat a baseline). Plots use
matplotlib's object-oriented API on the Agg canvas, so no display and no global pyplot
state are involved.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.patches import Rectangle

from metakv_cl.metrics import SUMMARY_FIGURES, balanced_accuracy, continual_summary, majority_rate
from metakv_cl.plotting import new_figure, save_figure
from metakv_cl.runfolder import atomic_write_text
from metakv_cl.statistics import BOOTSTRAP_FIGURES, Interval, holm, intervals_json, item_scores, paired_bootstrap

__all__ = [
    "SCORE_NAMES",
    "MethodResult",
    "item_outcomes",
    "json_text",
    "format_table",
    "format_task_table",
    "write_report",
    "plot_heatmap",
    "plot_curves",
    "plot_forgetting",
    "plot_slot_routing",
    "seed_statistics",
    "aggregate_seeds",
    "mean_result",
    "comparison_notes",
    "seed_intervals",
    "write_seed_report",
]

# score name -> higher is better
SCORE_NAMES = {"accuracy": True, "loss": False}

SIGN_CONVENTIONS = (
    "Figures are oriented the same way for accuracy and loss: forgetting > 0 means earlier "
    "experiences got worse (Chaudhry et al. 2018: best earlier score minus final score); "
    "BWT > 0 means later training improved earlier experiences and BWT < 0 is forgetting "
    "(GEM: final score minus score right after training); FWT > 0 means earlier training "
    "helped an experience before it was trained (GEM: score just before training minus the "
    "untrained model's score). For losses the differences are negated so that these "
    "readings hold; perplexity = exp(mean final loss over experiences)."
)

_FIGURE_HEADERS = {"average": "average", "forgetting": "forgetting", "bwt": "BWT", "fwt": "FWT",
                   "perplexity": "perplexity", "exact_match": "exact match"}


@dataclass
class MethodResult:
    """One method's run on a stream.

    Args:
        method: method (strategy) name, unique within a report.
        experience_names: one name per experience, in stream order.
        score_name: ``"accuracy"`` (higher is better) or ``"loss"`` (mean per-token NLL in
            nats, lower is better).
        matrix: R as rows: row 0 before training, row i after experience i; a partial run
            has fewer than T + 1 rows. NaN or None marks an unmeasured cell.
        extra: anything else worth keeping: ``wall_time_s``, ``peak_memory_bytes``,
            ``trainable_params``, ``seed``, ...
        items: the per-item outcome of every evaluation, in test-set order (None: not recorded).
            For accuracy ``{"gold": [[task's gold choice per item] per task], "num_choices": [per
            task], "predicted": [[[predicted choice per item] per task] per row of R]}``, with
            generative exact match also ``"generated_correct"`` (bools, laid out as
            ``"predicted"``); for loss ``{"tokens": [[scored tokens per item] per task], "nll":
            [[[summed NLL per item] per task] per row]}``. Build it with :func:`item_outcomes`.
    """

    method: str
    experience_names: list[str]
    score_name: str
    matrix: list[list[float]]
    extra: dict[str, Any] = field(default_factory=dict)
    items: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.score_name not in SCORE_NAMES:
            raise ValueError(f"{self.method}: score_name must be one of {sorted(SCORE_NAMES)}, got {self.score_name!r}")
        self.experience_names = list(self.experience_names)
        self.matrix = [[math.nan if cell is None else float(cell) for cell in row] for row in self.matrix]
        if any(len(row) != len(self.experience_names) for row in self.matrix):
            raise ValueError(
                f"{self.method}: every matrix row needs one score per experience "
                f"({len(self.experience_names)}), got row lengths {[len(row) for row in self.matrix]}"
            )
        if self.items is not None:
            self._check_items()

    def _check_items(self) -> None:
        fixed, per_row = ITEM_FIELDS[self.score_name]
        missing = [key for key in (fixed, per_row) if key not in self.items]
        if missing:
            raise ValueError(f"{self.method}: items of a {self.score_name} result need {missing}")
        sizes = [len(values) for values in self.items[fixed]]
        if len(sizes) != len(self.experience_names):
            raise ValueError(f"{self.method}: items[{fixed!r}] needs one list per experience "
                             f"({len(self.experience_names)}), got {len(sizes)}")
        for key in (per_row, *(["generated_correct"] if "generated_correct" in self.items else [])):
            rows = self.items[key]
            if len(rows) != len(self.matrix):
                raise ValueError(f"{self.method}: items[{key!r}] needs one row per matrix row ({len(self.matrix)}), "
                                 f"got {len(rows)}")
            if any([len(values) for values in row] != sizes for row in rows):
                raise ValueError(f"{self.method}: items[{key!r}] needs, in every row, {sizes} items per experience")

    @property
    def higher_is_better(self) -> bool:
        return SCORE_NAMES[self.score_name]

    @property
    def summary(self) -> dict[str, Any]:
        """:func:`metakv_cl.metrics.continual_summary` of the matrix."""
        return continual_summary(self.matrix, self.higher_is_better)

    @property
    def exact_match_matrix(self) -> list[list[float]] | None:
        """R of generative exact match (the share of each experience's test items whose greedy
        decoding is the gold label), from the per-item outcomes; None where it was not recorded."""
        if self.items is None or "generated_correct" not in self.items:
            return None
        return [[sum(task) / len(task) for task in row] for row in self.items["generated_correct"]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN cells become null); ``summary`` is included for readers
        and ignored by :meth:`from_json`.

        Returns:
            ``{"method", "experience_names", "score_name", "matrix", "extra", "summary"}``, and
            where per-item outcomes were recorded ``items``, the bootstrap ``intervals`` of the
            summary figures (:func:`metakv_cl.statistics.paired_bootstrap` over test items),
            for accuracy the per-experience ``tasks`` rows (:meth:`task_rows`), and with generative
            exact match ``exact_match``: its ``matrix`` (:attr:`exact_match_matrix`) and ``summary``.
        """
        data = {
            "method": self.method,
            "experience_names": self.experience_names,
            "score_name": self.score_name,
            "matrix": self.matrix,
            "extra": self.extra,
            "summary": self.summary,
        }
        if self.items is not None:
            data["intervals"] = intervals_json(self.intervals())
            if self.higher_is_better:
                data["tasks"] = self.task_rows()
            exact_match = self.exact_match_matrix
            if exact_match is not None:
                data["exact_match"] = {"matrix": exact_match, "summary": continual_summary(exact_match, True)}
            data["items"] = self.items
        return _json_safe(data)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "MethodResult":
        """Rebuild a result from :meth:`to_json` output (a dict or its JSON text).

        Raises:
            KeyError: if a required field is missing.
        """
        if isinstance(data, str):
            data = json.loads(data)
        missing = [key for key in ("method", "experience_names", "score_name", "matrix") if key not in data]
        if missing:
            raise KeyError(f"MethodResult JSON lacks {missing}; has {sorted(data)}")
        return cls(method=data["method"], experience_names=data["experience_names"], score_name=data["score_name"],
                   matrix=data["matrix"], extra=dict(data.get("extra", {})), items=data.get("items"))

    def intervals(self) -> dict[str, dict[str, Interval | None]]:
        """95% bootstrap intervals of average, forgetting and BWT over this run's test items.

        Returns:
            ``{"method": {figure: Interval or None}}`` (:func:`metakv_cl.statistics.paired_bootstrap`).

        Raises:
            ValueError: the result has no per-item outcomes.
        """
        return paired_bootstrap(item_scores([self]))

    def task_rows(self) -> list[dict[str, Any]]:
        """Per experience of an accuracy result, from the last row of R and the per-item outcomes.

        Returns:
            One dict per experience: ``experience``, ``accuracy`` (the last row's), and with
            per-item outcomes ``balanced_accuracy``, ``chance`` (1 / number of choices),
            ``majority_rate`` (share of the most frequent gold label) and ``did_not_learn``
            (trained, and the accuracy is not above the majority rate; None before training),
            and with generative exact match ``exact_match`` (the last row's).
        """
        final = self.matrix[-1]
        exact_match = self.exact_match_matrix
        trained = self.summary["num_trained"]
        rows = []
        for j, name in enumerate(self.experience_names):
            row: dict[str, Any] = {"experience": name, "accuracy": final[j]}
            if self.items is not None:
                gold = self.items["gold"][j]
                majority = majority_rate(gold)
                row.update(
                    balanced_accuracy=balanced_accuracy(self.items["predicted"][-1][j], gold),
                    chance=1.0 / self.items["num_choices"][j],
                    majority_rate=majority,
                    did_not_learn=final[j] <= majority if j < trained else None,
                )
            if exact_match is not None:
                row["exact_match"] = exact_match[-1][j]
            rows.append(row)
        return rows

    def did_not_learn(self) -> list[str]:
        """The experiences this accuracy result did not learn (see :meth:`task_rows`); [] for losses
        and results without per-item outcomes."""
        if not self.higher_is_better or self.items is None:
            return []
        return [row["experience"] for row in self.task_rows() if row["did_not_learn"]]


# score name -> (per-item field fixed by the test set, per-item field of each evaluation)
ITEM_FIELDS = {"accuracy": ("gold", "predicted"), "loss": ("tokens", "nll")}


def item_outcomes(score_name: str, evaluations: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """The compact :attr:`MethodResult.items` of a run from its evaluations.

    Args:
        score_name: ``"accuracy"`` or ``"loss"``.
        evaluations: per row of R, per experience, the evaluation's
            :attr:`~metakv_cl.training.module.ContinualLMModule.eval_items`.

    Returns:
        The test set's fixed fields once (gold choices and number of choices, or token counts),
        and the evaluated fields (predicted choices, and where every evaluation recorded it
        whether greedy decoding produced the gold label; or summed NLL) per row.
    """
    fixed, per_row = ITEM_FIELDS[score_name]
    first = evaluations[0]
    items = {fixed: [task[fixed] for task in first], per_row: [[task[per_row] for task in row] for row in evaluations]}
    if score_name == "accuracy":
        items["num_choices"] = [task["num_choices"] for task in first]
        if all("generated_correct" in task for row in evaluations for task in row):
            items["generated_correct"] = [[task["generated_correct"] for task in row] for row in evaluations]
    return items


# An array of plain values laid out one per line by json.dumps(indent=...). JSON strings never hold
# a raw newline, so a match spanning newlines is always structure, never text inside a string.
_VALUE_ARRAY = re.compile(r"\[\n\s*((?:[^\[\]{}\n\"]+,\n\s*)*[^\[\]{}\n\"]+)\n\s*\]")


def replace_generated_block(text: str, name: str, content: str) -> str:
    """``text`` with the block between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``
    replaced by ``content``: how a page such as the README quotes results that a report command wrote,
    so that no number in it is typed by hand.

    Raises:
        ValueError: the page lacks either marker, or holds the block twice.
    """
    start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the page needs exactly one '{start}' followed by one '{end}' to hold the generated block")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


def json_text(data: Any) -> str:
    """``data`` as indented JSON with every array of numbers (or null / booleans) on one line:
    per-item outcomes stay a few lines per experience instead of one line per item.

    Args:
        data: JSON-ready data (see :meth:`MethodResult.to_json`).

    Returns:
        The JSON text, ending in a newline.
    """
    text = json.dumps(data, indent=2)
    return _VALUE_ARRAY.sub(lambda match: "[" + re.sub(r",\n\s*", ", ", match.group(1)) + "]", text) + "\n"


def _json_safe(value: Any) -> Any:
    """Recursively convert to JSON types: NaN/inf -> None, tensors/arrays -> lists, paths -> str."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return _json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _figure_keys(results: Sequence[MethodResult]) -> list[str]:
    has_loss = any(not result.higher_is_better for result in results)
    return [*SUMMARY_FIGURES, *(("perplexity",) if has_loss else ())]


def _format_number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _format_params(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _check_results(results: Sequence[MethodResult]) -> None:
    if not results:
        raise ValueError("no results to report")
    names = [result.method for result in results]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"method names must be unique within a report, repeated: {duplicated}")


def format_table(results: Sequence[MethodResult]) -> str:
    """The side-by-side Markdown table: one row per method, with its footnotes.

    Args:
        results: the methods to compare (usually on one stream and seed).

    Returns:
        A Markdown table with score, average, forgetting, BWT, FWT, perplexity (when any
        result is a loss), wall time, training tokens per second (all devices together, the
        training batches alone) and trainable parameters. Undefined figures show "–";
        a partial run is marked "(k/T trained)" after its name. Where per-item outcomes were
        recorded, average, forgetting and BWT carry their 95% bootstrap interval over test
        items, and accuracy results get a "did not learn" column (the experiences whose final
        accuracy is not above their majority rate); footnotes under the table explain both and
        name every method that learned none of its trained experiences. Where any result
        recorded generative exact match, an "exact match" column gives its average.

    Raises:
        ValueError: if ``results`` is empty or repeats a method name.
    """
    _check_results(results)
    figures = _figure_keys(results)
    flagged = any(result.higher_is_better and result.items is not None for result in results)
    generative = any(result.exact_match_matrix is not None for result in results)
    header = ["method", "score", *(_FIGURE_HEADERS[f] for f in figures), *(["exact match"] if generative else []),
              *(["did not learn"] if flagged else []), "wall time (s)", "train tokens/s", "trainable params"]
    rows, notes = [], []
    for result in results:
        summary = result.summary
        trained, total = summary["num_trained"], len(result.experience_names)
        intervals = result.intervals()["method"] if result.items is not None else {}
        cells = [_format_number(summary.get(figure)) + _interval_suffix(intervals.get(figure)) for figure in figures]
        if generative:
            exact_match = result.exact_match_matrix
            average = None if exact_match is None else continual_summary(exact_match, True)["average"]
            cells.append(_format_number(average))
        if flagged:
            cells.append(_did_not_learn_cell(result))
            if trained and len(result.did_not_learn()) == trained:
                notes.append(f"**{result.method} learned none of its {trained} trained experiences**: its final "
                             "accuracy is at or below the majority rate on every one, so its forgetting and BWT "
                             "measure nothing learned.")
        rows.append([
            result.method if trained == total else f"{result.method} ({trained}/{total} trained)",
            result.score_name,
            *cells,
            _format_number(result.extra.get("wall_time_s"), digits=1),
            _format_number(result.extra.get("train_tokens_per_s"), digits=0),
            _format_params(result.extra.get("trainable_params")),
        ])
    if any(result.items is not None for result in results):
        notes.append(INTERVAL_NOTE)
    if flagged:
        notes.append(DID_NOT_LEARN_NOTE)
    if generative:
        notes.append(EXACT_MATCH_NOTE)
    return "\n\n".join([_markdown_table(header, rows), *notes])


INTERVAL_NOTE = ("[low, high]: 95% percentile interval of a bootstrap over the test items, 10,000 resamples "
                 "(metakv_cl/statistics.py).")
EXACT_MATCH_NOTE = ("exact match: the share of test items whose greedy decoding after the prompt is exactly the gold "
                    "label's tokens (end-of-text included), averaged like the score over the final row; the score "
                    "ranks the candidate labels by likelihood instead.")
DID_NOT_LEARN_NOTE = ("did not learn: experiences whose final accuracy is not above their majority rate (the share "
                      "of the most frequent gold label in the test set, what always answering it scores).")


def _interval_suffix(interval: Interval | None) -> str:
    return "" if interval is None else f" [{interval.low:.3f}, {interval.high:.3f}]"


def _did_not_learn_cell(result: MethodResult) -> str:
    if not result.higher_is_better or result.items is None:
        return "–"
    names = result.did_not_learn()
    trained = result.summary["num_trained"]
    if not names:
        return "none"
    return f"**all {trained}**" if len(names) == trained else ", ".join(names)


def format_task_table(results: Sequence[MethodResult]) -> str:
    """Per experience of every accuracy result: accuracy, balanced accuracy, chance, majority rate
    and, where recorded, generative exact match.

    Args:
        results: the methods; loss results are left out.

    Returns:
        A Markdown table (one row per method and experience, the final row of R), the
        experiences a method did not learn marked "**did not learn**", with a footnote; "" if
        no result is scored by accuracy.
    """
    return _task_table({result.method: result.task_rows() for result in results if result.higher_is_better})


def _task_table(rows_by_method: dict[str, list[dict[str, Any]]]) -> str:
    generative = any(task.get("exact_match") is not None for tasks in rows_by_method.values() for task in tasks)
    keys = ("balanced_accuracy", "chance", "majority_rate", *(("exact_match",) if generative else ()))
    rows = []
    for method, tasks in rows_by_method.items():
        for task in tasks:
            flag = {True: "**did not learn**", False: "", None: "–"}[task.get("did_not_learn")]
            rows.append([method, task["experience"], _format_number(task["accuracy"]),
                         *(_format_number(task.get(key)) for key in keys), flag])
    if not rows:
        return ""
    header = ["method", "experience", "accuracy", "balanced accuracy", "chance", "majority",
              *(["exact match"] if generative else []), ""]
    return _markdown_table(header, rows) + "\n\n" + DID_NOT_LEARN_NOTE


def _row_labels(result: MethodResult) -> list[str]:
    return ["before training"] + [f"after {i}: {name}" for i, name in enumerate(result.experience_names, 1)]


def _matrix_markdown(result: MethodResult, matrix: list[list[float]] | None = None, corner: str = "R") -> str:
    """A matrix of ``result`` (default its R) as a Markdown table, ``corner`` naming it."""
    header = [corner, *(f"{j}: {name}" for j, name in enumerate(result.experience_names, 1))]
    rows = [[label, *(_format_number(cell) for cell in row)]
            for label, row in zip(_row_labels(result), result.matrix if matrix is None else matrix)]
    return _markdown_table(header, rows)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "method"


def _method_slugs(results: Sequence[MethodResult]) -> list[str]:
    """File-name slugs of the methods, made unique ("LoRA (shared)" and "lora shared" must not
    overwrite each other's plots)."""
    slugs: list[str] = []
    for result in results:
        slug = _slug(result.method)
        while slug in slugs:
            slug += "_"
        slugs.append(slug)
    return slugs


def _wrap(label: str, width: int = 18) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


def plot_heatmap(result: MethodResult, path: Path) -> Path:
    """R as a heatmap with each cell's value written in it; better scores are brighter.

    Args:
        result: the method's result.
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    num_rows, num_cols = len(result.matrix), len(result.experience_names)
    figure = new_figure(figsize=(2.0 + 1.3 * num_cols, 1.2 + 0.6 * num_rows))
    axes = figure.add_subplot()
    finite = [cell for row in result.matrix for cell in row if math.isfinite(cell)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high == low:
        high = low + 1.0
    # viridis: bright = better for accuracies; reversed for losses.
    cmap = "viridis" if result.higher_is_better else "viridis_r"
    image = axes.imshow(result.matrix, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(result.score_name)
    for i, row in enumerate(result.matrix):
        for j, cell in enumerate(row):
            if not math.isfinite(cell):
                axes.text(j, i, "–", ha="center", va="center", color="grey")
                continue
            brightness = (cell - low) / (high - low)
            if not result.higher_is_better:
                brightness = 1.0 - brightness
            axes.text(j, i, f"{cell:.2f}", ha="center", va="center", fontsize=9,
                      color="black" if brightness > 0.55 else "white")
    for j in range(min(num_cols, num_rows - 1)):  # the cell right after training each experience
        axes.add_patch(Rectangle((j - 0.5, j + 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    axes.set_xticks(range(num_cols), [_wrap(f"{j}: {name}") for j, name in enumerate(result.experience_names, 1)],
                    rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(num_rows), _row_labels(result)[:num_rows], fontsize=8)
    axes.set_xlabel("evaluated experience")
    axes.set_ylabel("training progress")
    axes.set_title(f"{result.method}: {result.score_name} matrix R (red: just trained)")
    return save_figure(figure, path, tight=True)


def plot_curves(result: MethodResult, path: Path) -> Path:
    """Each experience's score after each training step; a star marks where it was trained.

    Args:
        result: the method's result.
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    figure = new_figure(figsize=(7.5, 4.2))
    axes = figure.add_subplot()
    steps = range(len(result.matrix))
    for j, name in enumerate(result.experience_names):
        line, = axes.plot(steps, [row[j] for row in result.matrix], marker="o", markersize=4, label=f"{j + 1}: {name}")
        if j + 1 < len(result.matrix):
            axes.plot([j + 1], [result.matrix[j + 1][j]], marker="*", markersize=13, color=line.get_color())
    axes.set_xticks(list(steps), ["init"] + [f"after {i}" for i in steps[1:]])
    axes.set_xlabel("training progress")
    axes.set_ylabel(result.score_name + ("" if result.higher_is_better else " (lower is better)"))
    axes.set_title(f"{result.method}: score per experience (star: just trained)")
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="experience")
    return save_figure(figure, path, tight=True)


def plot_forgetting(results: Sequence[MethodResult], path: Path) -> Path:
    """Forgetting per experience and its mean, one bar per method (a panel per score type).

    Args:
        results: the methods to compare.
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    panels = [name for name in SCORE_NAMES if any(result.score_name == name for result in results)]
    figure = new_figure(figsize=(max(6.0, 1.2 * max(len(r.experience_names) for r in results) + 3), 3.8 * len(panels)))
    for panel, score_name in enumerate(panels, 1):
        axes = figure.add_subplot(len(panels), 1, panel)
        group = [result for result in results if result.score_name == score_name]
        num_groups = max(len(result.summary["forgetting_per_experience"]) for result in group) + 1
        width = 0.8 / len(group)
        for index, result in enumerate(group):
            summary = result.summary
            values = [math.nan if v is None else v for v in summary["forgetting_per_experience"]]
            values += [math.nan] * (num_groups - 1 - len(values))
            values.append(math.nan if summary["forgetting"] is None else summary["forgetting"])
            positions = [g + (index - (len(group) - 1) / 2) * width for g in range(num_groups)]
            bars = axes.bar(positions, values, width=width, label=result.method)
            axes.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=7)
        names = group[0].experience_names
        axes.set_xticks(range(num_groups), [_wrap(f"{j}: {names[j - 1]}" if j <= len(names) else str(j))
                                            for j in range(1, num_groups)] + ["mean"], fontsize=8)
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.set_ylabel(f"forgetting ({score_name})\n> 0: got worse")
        axes.set_title(f"Forgetting per experience ({score_name})")
        axes.legend(fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path, tight=True)


def plot_slot_routing(result: MethodResult, path: Path) -> Path:
    """Which slots of the addressed bank each test experience reads: a heatmap experience x slot.

    Each cell is the mean read weight of the slot over the experience's test tokens (averaged
    over layers; a row sums to 1); the slots are labelled with the training experience that
    opened them.

    Args:
        result: a method whose ``extra`` holds the routing of
            :meth:`~metakv_cl.strategies.plugins.BankSchedule.routing` (``slot_read_weights``,
            ``slot_read_experiences``, ``slot_experience``).
        path: where to write the PNG.

    Returns:
        ``path``.
    """
    weights = result.extra["slot_read_weights"]
    rows, owners = result.extra["slot_read_experiences"], result.extra["slot_experience"]
    figure = new_figure(figsize=(2.5 + 0.35 * len(owners), 1.4 + 0.5 * len(weights)))
    axes = figure.add_subplot()
    image = axes.imshow(weights, cmap="magma", vmin=0.0, vmax=max(max(row) for row in weights) or 1.0, aspect="auto")
    figure.colorbar(image, ax=axes).set_label("mean read weight")
    axes.set_xticks(range(len(owners)), [f"{slot}" if owner is None else f"{slot} (e{owner + 1})"
                                         for slot, owner in enumerate(owners)], rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(weights)), [_wrap(f"{j + 1}: {result.experience_names[j]}") for j in rows], fontsize=8)
    axes.set_xlabel("slot (e<k>: opened for experience k)")
    axes.set_ylabel("test experience")
    axes.set_title(f"{result.method}: slots read per experience")
    return save_figure(figure, path, tight=True)


def write_report(results: Sequence[MethodResult], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots for a set of methods.

    Args:
        results: one result per method (unique method names).
        out_dir: output folder; created if missing. Existing report files are overwritten.

    Returns:
        Paths by key: ``"json"``, ``"markdown"``, ``"forgetting_plot"``, per method
        ``"heatmap:<method>"`` and ``"curves:<method>"``, and ``"routing:<method>"`` for a method
        with recorded slot reads.

    Raises:
        ValueError: if ``results`` is empty or repeats a method name.
    """
    _check_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for result, slug in zip(results, _method_slugs(results)):
        paths[f"heatmap:{result.method}"] = plot_heatmap(result, out / f"heatmap_{slug}.png")
        paths[f"curves:{result.method}"] = plot_curves(result, out / f"curves_{slug}.png")
        if "slot_read_weights" in result.extra:
            paths[f"routing:{result.method}"] = plot_slot_routing(result, out / f"routing_{slug}.png")
    paths["forgetting_plot"] = plot_forgetting(results, out / "forgetting.png")

    report = {
        "sign_conventions": SIGN_CONVENTIONS,
        "methods": [result.to_json() for result in results],
        "did_not_learn": {result.method: result.did_not_learn() for result in results},
        "plots": {key: path.name for key, path in paths.items()},
    }
    paths["json"] = out / "report.json"
    atomic_write_text(json_text(report), paths["json"])

    sections = ["# Continual-learning report", "", format_table(results), ""]
    task_table = format_task_table(results)
    if task_table:
        sections += ["## Per experience (final row of R)", "", task_table, ""]
    sections += [SIGN_CONVENTIONS, "", f"![forgetting per method]({paths['forgetting_plot'].name})", ""]
    for result in results:
        sections += [f"## {result.method}", "", _matrix_markdown(result), ""]
        if result.exact_match_matrix is not None:
            sections += [_matrix_markdown(result, result.exact_match_matrix, "exact match"), ""]
        sections += [f"![R heatmap]({paths[f'heatmap:{result.method}'].name})", ""]
    paths["markdown"] = out / "report.md"
    atomic_write_text("\n".join(sections), paths["markdown"])
    return paths


# Facts of a run's ``extra`` that the seed aggregation averages besides the figures.
RUN_FACTS = ("wall_time_s", "peak_memory_bytes", "trainable_params")


def seed_statistics(results_by_seed: Sequence[Sequence[MethodResult]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of every figure, per method.

    Args:
        results_by_seed: one list of results per seed; methods are matched by name.

    Returns:
        method -> ``{"score_name", "seeds", <key>: {"mean", "std", "n"}}`` for the figures
        (average, forgetting, bwt, fwt, perplexity for losses), ``exact_match`` (the average of the
        exact-match matrix) where every seed recorded generative exact match, and the run facts
        ``wall_time_s``, ``peak_memory_bytes`` and ``trainable_params``. ``std`` is the sample
        standard deviation (None with one seed: no spread); undefined values of a seed are left out and ``n``
        counts the rest.

    Raises:
        ValueError: if there are no results, or one method has different score names.
    """
    by_method = _runs_by_method(results_by_seed)
    statistics_by_method = {}
    for method, runs in by_method.items():
        summaries = [run.summary for run in runs]
        entry: dict[str, Any] = {"score_name": runs[0].score_name, "seeds": len(runs)}
        values_by_key = {figure: [summary.get(figure) for summary in summaries] for figure in _figure_keys(runs)}
        exact_match = [run.exact_match_matrix for run in runs]
        if all(matrix is not None for matrix in exact_match):
            values_by_key["exact_match"] = [continual_summary(matrix, True)["average"] for matrix in exact_match]
        values_by_key.update({fact: [run.extra.get(fact) for run in runs] for fact in RUN_FACTS})
        for key, values in values_by_key.items():
            present = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(float(v))]
            entry[key] = {
                "mean": statistics.fmean(present) if present else None,
                "std": statistics.stdev(present) if len(present) > 1 else None,  # one seed has no spread
                "n": len(present),
            }
        statistics_by_method[method] = entry
    return statistics_by_method


def _runs_by_method(results_by_seed: Sequence[Sequence[MethodResult]]) -> dict[str, list[MethodResult]]:
    by_method: dict[str, list[MethodResult]] = {}
    for seed_results in results_by_seed:
        _check_results(seed_results)
        for result in seed_results:
            by_method.setdefault(result.method, []).append(result)
    if not by_method:
        raise ValueError("no results to aggregate")
    for method, runs in by_method.items():
        score_names = {run.score_name for run in runs}
        if len(score_names) > 1:
            raise ValueError(f"method {method!r} mixes score names across seeds: {sorted(score_names)}")
    return by_method


def mean_and_spread(mean: float, std: float | None, digits: int = 3) -> str:
    """``mean ± std``, or the mean alone where there is no spread to give (a single seed)."""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _mean_std_cell(entry: dict[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    if entry is None or entry["mean"] is None:
        return "–"
    return mean_and_spread(entry["mean"] / scale, None if entry["std"] is None else entry["std"] / scale, digits)


def aggregate_seeds(results_by_seed: Sequence[Sequence[MethodResult]]) -> str:
    """A Markdown table of mean +- std over seeds, one row per method.

    Args:
        results_by_seed: one list of :class:`MethodResult` per seed; methods are matched by
            name (a method missing from some seeds is averaged over the seeds it has).

    Returns:
        The table: method, score, seeds, average, forgetting, BWT, FWT, perplexity (when any
        method is scored by loss), exact match (when any method recorded it), wall time and peak
        memory, each as ``mean ± std``, and the trainable parameters.

    Raises:
        ValueError: see :func:`seed_statistics`.
    """
    stats = seed_statistics(results_by_seed)
    has_loss = any(entry["score_name"] == "loss" for entry in stats.values())
    figures = [*SUMMARY_FIGURES, *(("perplexity",) if has_loss else ())]
    figures += ["exact_match"] if any("exact_match" in entry for entry in stats.values()) else []
    header = ["method", "score", "seeds", *(_FIGURE_HEADERS[f] for f in figures), "wall time (s)",
              "peak memory (GiB)", "trainable params"]
    rows = [[method, entry["score_name"], str(entry["seeds"]), *(_mean_std_cell(entry.get(f)) for f in figures),
             _mean_std_cell(entry["wall_time_s"], digits=1),
             _mean_std_cell(entry["peak_memory_bytes"], digits=2, scale=2**30),
             _format_params(entry["trainable_params"]["mean"])] for method, entry in stats.items()]
    return _markdown_table(header, rows)


def mean_result(runs: Sequence[MethodResult]) -> MethodResult:
    """One method's R averaged cell by cell over seeds (cells missing in a seed are left out).

    Args:
        runs: the method's results, one per seed (same method, experiences and score).

    Returns:
        A :class:`MethodResult` with the mean matrix (as many rows as the longest run) and
        ``extra = {"seeds": len(runs)}``.

    Raises:
        ValueError: no runs, or runs of different methods, experiences or scores.
    """
    if not runs:
        raise ValueError("mean_result needs at least one run")
    first = runs[0]
    for run in runs[1:]:
        if (run.method, run.experience_names, run.score_name) != (first.method, first.experience_names, first.score_name):
            raise ValueError(f"cannot average runs of different methods or streams: {first.method!r} vs {run.method!r}")
    num_rows = max(len(run.matrix) for run in runs)
    matrix = []
    for i in range(num_rows):
        row = []
        for j in range(len(first.experience_names)):
            cells = [run.matrix[i][j] for run in runs if i < len(run.matrix) and not math.isnan(run.matrix[i][j])]
            row.append(statistics.fmean(cells) if cells else math.nan)
        matrix.append(row)
    return MethodResult(first.method, first.experience_names, first.score_name, matrix, {"seeds": len(runs)})


def comparison_notes(stats: dict[str, dict[str, Any]], candidates: Sequence[str]) -> list[str]:
    """Where each candidate method does *not* beat another method, in words.

    A candidate beats a method on a figure when its mean over seeds is better: a higher final
    average for accuracies, a lower one for losses, and a lower forgetting in both cases.

    Args:
        stats: :func:`seed_statistics` output.
        candidates: the methods under test (e.g. the Meta-KV variants); the others are the
            baselines they are compared with.

    Returns:
        One Markdown bullet per candidate and figure it fails to win, naming the baselines with
        their ``mean ± std``; a bullet saying it beats every baseline otherwise.
    """
    baselines = [method for method in stats if method not in candidates]
    notes = []
    for candidate in candidates:
        entry = stats.get(candidate)
        if entry is None:
            continue
        higher_is_better = SCORE_NAMES[entry["score_name"]]
        lost = False
        for figure, better_is_higher in (("average", higher_is_better), ("forgetting", False)):
            mine = entry[figure]["mean"]
            if mine is None:
                continue
            winners = []
            for baseline in baselines:
                theirs = stats[baseline][figure]["mean"]
                if theirs is not None and (theirs >= mine if better_is_higher else theirs <= mine):
                    winners.append(f"{baseline} ({_mean_std_cell(stats[baseline][figure])})")
            if winners:
                lost = True
                notes.append(f"- **{candidate} does not beat** {', '.join(winners)} on {figure} "
                             f"({entry['score_name'] if figure == 'average' else 'forgetting'}: "
                             f"{candidate} {_mean_std_cell(entry[figure])}).")
        if not lost and baselines:
            notes.append(f"- {candidate} beats every baseline on final average and forgetting.")
    return notes


def seed_intervals(results_by_seed: Sequence[Sequence[MethodResult]], reference: str | None = None) -> dict[str, Any]:
    """Bootstrap intervals over seeds and test items of every method with per-item outcomes.

    Args:
        results_by_seed: one list of results per seed; a method is paired with the reference
            seed by seed (both must appear in the same seeds).
        reference: the method every other one is compared with (None: no comparison).

    Returns:
        ``{"intervals": {method: {figure: Interval}}}`` for the methods whose every run has
        per-item outcomes, and with a reference ``"differences"``: ``{method: {figure:
        Interval}}`` (method minus reference) and ``"holm"``: the same nesting of Holm-adjusted
        p-values, the family being every difference of this stream.

    Raises:
        ValueError: an unknown reference, a reference without per-item outcomes, or a method
            that did not run on the reference's seeds.
    """
    by_method: dict[str, dict[int, MethodResult]] = {}
    for index, seed_results in enumerate(results_by_seed):
        for result in seed_results:
            by_method.setdefault(result.method, {})[index] = result
    recorded = {method: runs for method, runs in by_method.items() if all(r.items is not None for r in runs.values())}
    if reference is not None and reference not in recorded:
        allowed = ", ".join(sorted(recorded)) or "none"
        raise ValueError(
            f"reference {reference!r} is not a method with per-item outcomes here; choose one of: {allowed}"
        )
    out: dict[str, Any] = {"intervals": {}}
    if reference is not None:
        out["differences"] = {}
    for method, runs in recorded.items():
        paired = reference is not None and method != reference
        if paired and set(runs) != set(recorded[reference]):
            raise ValueError(f"{method!r} ran on seeds {sorted(runs)} and the reference {reference!r} on "
                             f"{sorted(recorded[reference])}; a paired comparison needs the same seeds")
        scores = item_scores([runs[i] for i in sorted(runs)])
        base = item_scores([recorded[reference][i] for i in sorted(runs)]) if paired else None
        bootstrap = paired_bootstrap(scores, base)
        out["intervals"][method] = bootstrap["method"]
        if paired:
            out["differences"][method] = bootstrap["difference"]
    if reference is not None:
        keys = [(method, figure) for method, figures in out["differences"].items() for figure in figures]
        adjusted = holm([None if out["differences"][m][f] is None else out["differences"][m][f].p_value
                         for m, f in keys])
        out["holm"] = {method: {} for method in out["differences"]}
        for (method, figure), p_value in zip(keys, adjusted):
            out["holm"][method][figure] = p_value
    return out


def _mean_task_rows(runs: Sequence[MethodResult]) -> list[dict[str, Any]]:
    """:meth:`MethodResult.task_rows` averaged over seeds; "did not learn" from the means."""
    per_seed = [run.task_rows() for run in runs]
    rows = []
    for j, name in enumerate(runs[0].experience_names):
        row: dict[str, Any] = {"experience": name}
        keys = ("accuracy", "balanced_accuracy", "chance", "majority_rate")
        if all("exact_match" in seed_rows[j] for seed_rows in per_seed):
            keys += ("exact_match",)
        for key in keys:
            values = [seed_rows[j].get(key) for seed_rows in per_seed]
            present = [v for v in values if v is not None and not math.isnan(v)]
            row[key] = statistics.fmean(present) if present else None
        flags = [seed_rows[j].get("did_not_learn") for seed_rows in per_seed]
        row["did_not_learn"] = None if None in flags else row["accuracy"] <= row["majority_rate"]
        rows.append(row)
    return rows


def _interval_table(intervals: dict[str, Any], reference: str | None) -> list[str]:
    """The report sections of :func:`seed_intervals` output."""
    figures = [_FIGURE_HEADERS[f] for f in BOOTSTRAP_FIGURES]
    rows = [[method, *(_format_interval(by_figure[f]) for f in BOOTSTRAP_FIGURES)]
            for method, by_figure in intervals["intervals"].items()]
    note = ("[low, high]: 95% percentile interval of a bootstrap over seeds and test items, 10,000 resamples "
            "(metakv_cl/statistics.py).")
    sections = ["## 95% intervals", "", note, "", _markdown_table(["method", *figures], rows), ""]
    if reference is not None and intervals["differences"]:
        header = ["method"] + [part for f in figures for part in (f"Δ {f}", "p (Holm)")]
        rows = [[method, *(cell for f in BOOTSTRAP_FIGURES for cell in (
            _format_interval(by_figure[f]), _format_p(intervals["holm"][method][f])))]
            for method, by_figure in intervals["differences"].items()]
        sections += [f"## Difference to {reference} (method minus {reference})", "",
                     "Paired: both methods resampled with the same seeds and test items. p: two-sided bootstrap "
                     "p-value, Holm-adjusted over every difference in this table.", "",
                     _markdown_table(header, rows), ""]
    return sections


def _format_interval(interval: Interval | None) -> str:
    return "–" if interval is None else f"{interval.estimate:.3f}{_interval_suffix(interval)}"


def _format_p(p_value: float | None) -> str:
    return "–" if p_value is None else f"{p_value:.3g}"


def write_seed_report(
    results_by_seed: Sequence[Sequence[MethodResult]],
    out_dir: str | Path,
    *,
    title: str,
    header: dict[str, Any] | None = None,
    candidates: Sequence[str] = (),
    reference: str | None = None,
) -> dict[str, Path]:
    """Write the report of one stream over several seeds: table, JSON and plots.

    Files: ``README.md`` (title, the header facts, the mean ± std table, the 95% bootstrap
    intervals and differences to the reference where per-item outcomes exist, the per-experience
    table of accuracy streams with the "did not learn" flags, where each candidate does not beat
    a baseline, the sign conventions, each method's mean R), ``results.json`` (header,
    statistics, intervals, per-experience rows and every seed's results), ``heatmap_<method>.png``
    (mean R) and ``forgetting.png`` (forgetting per experience of the mean R, one bar per method).

    Args:
        results_by_seed: one list of results per seed.
        out_dir: output folder (created; its report files are overwritten).
        title: the report's title (say which model and stream).
        header: facts printed under the title and stored in the JSON (command, commit, GPU,
            date, notes on the model or data substitutions, ...).
        candidates: the methods under test, compared with the others by
            :func:`comparison_notes`.
        reference: the method each other one's difference is reported against (see
            :func:`seed_intervals`).

    Returns:
        Paths by key: ``"markdown"``, ``"json"``, ``"forgetting_plot"``, ``"heatmap:<method>"``.

    Raises:
        ValueError: see :func:`seed_statistics` and :func:`seed_intervals`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = dict(header or {})
    stats = seed_statistics(results_by_seed)
    runs_by_method = _runs_by_method(results_by_seed)
    means = [mean_result(runs) for runs in runs_by_method.values()]
    intervals = seed_intervals(results_by_seed, reference)
    tasks = {method: _mean_task_rows(runs) for method, runs in runs_by_method.items() if runs[0].higher_is_better}
    did_not_learn = {method: [row["experience"] for row in rows if row["did_not_learn"]]
                     for method, rows in tasks.items()}
    paths: dict[str, Path] = {}
    for result, slug in zip(means, _method_slugs(means)):
        paths[f"heatmap:{result.method}"] = plot_heatmap(result, out / f"heatmap_{slug}.png")
    paths["forgetting_plot"] = plot_forgetting(means, out / "forgetting.png")

    paths["json"] = out / "results.json"
    atomic_write_text(json_text(_json_safe({
        "title": title,
        "header": header,
        "sign_conventions": SIGN_CONVENTIONS,
        "statistics": stats,
        "reference": reference,
        "intervals": {key: intervals_json(value) if key != "holm" else value for key, value in intervals.items()},
        "tasks": tasks,
        "did_not_learn": did_not_learn,
        "mean_matrices": {result.method: result.matrix for result in means},
        "runs": [[result.to_json() for result in seed_results] for seed_results in results_by_seed],
        "plots": {key: path.name for key, path in paths.items() if key != "json"},
    })), paths["json"])

    sections = [f"# {title}", ""]
    sections += [f"- **{key}**: {value}" for key, value in header.items()]
    sections += ["", "Mean ± sample standard deviation over seeds (a method run on one seed: its value alone).", "", aggregate_seeds(results_by_seed), ""]
    sections += [f"- **{method} did not learn {', '.join(names)}**: mean final accuracy over seeds not above the "
                 "majority rate." for method, names in did_not_learn.items() if names]
    if intervals["intervals"]:
        sections += ["", *_interval_table(intervals, reference)]
    task_table = _task_table(tasks)
    if task_table:
        sections += ["## Per experience (final row of R, mean over seeds)", "", task_table, ""]
    notes = comparison_notes(stats, [c for c in candidates if c in stats])
    if notes:
        sections += ["## Meta-KV consolidation against the baselines", "", *notes, ""]
    sections += [SIGN_CONVENTIONS, "", f"![forgetting per method]({paths['forgetting_plot'].name})", ""]
    for result in means:
        sections += [f"## {result.method}: R averaged over {result.extra['seeds']} seed(s)", "",
                     _matrix_markdown(result), "", f"![R heatmap]({paths[f'heatmap:{result.method}'].name})", ""]
    paths["markdown"] = out / "README.md"
    atomic_write_text("\n".join(sections), paths["markdown"])
    return paths
