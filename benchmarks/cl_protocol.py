"""The protocol of the continual-learning suite, fixed in its config before any run.

Three parts, each read from the suite config (``configs/benchmarks/cl_suite.yaml``) and checked
before a cell runs:

* **Contrasts** (``protocol``): each table (a family of streams of one plan) names its
  reference, the method every difference of the table is taken against, and its primary
  contrasts: ``method`` minus ``reference``, with the claim it tests in words. ``report``
  gives each contrast's paired bootstrap difference on every stream of the family and
  Holm-adjusts its p-values across those streams (:func:`contrast_differences`).
* **Tuning** (``tuning``): every method has a grid of the same size (learning rate, and the
  method's own weights: EWC's lambda, LwF's weight); a ``tune: true`` plan runs every grid point
  on a development stream whose test set is a validation split carved from training items no
  reported stream uses; ``cl_suite tune`` picks each method's best point by the validation
  average (:func:`select_points`) and writes grid, scores and choice to JSON, which ``tuned: true``
  plans read.
* **Compute** (plan ``compute: fixed``): every method trains the same number of item-passes
  (:func:`fixed_compute_steps`).
"""

from __future__ import annotations

import itertools
import math
import statistics as stats
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from metakv_cl.report import mean_and_spread

if TYPE_CHECKING:
    from metakv_cl.report import MethodResult

# Extra plugins a suite method may ask for by name (``with: [replay, validated]``).
METHOD_ADDITIONS = ("replay", "validated")
COMPUTE_ARMS = ("nominal", "fixed")


@dataclass(frozen=True)
class Contrast:
    """One pre-registered difference: ``method`` minus ``reference``.

    Attributes:
        method: the method under test (a method of the family's plan).
        reference: the method it is compared with (same plan).
        claim: the comparison in words, as the report prints it.
    """

    method: str
    reference: str
    claim: str


@dataclass(frozen=True)
class Family:
    """A table: streams of one plan, the reference of every difference, the primary contrasts.

    Attributes:
        table: the table's name.
        plan: the plan whose cells fill it.
        streams: its streams (a subset of the plan's).
        reference: the method every difference in the table's stream reports is taken against.
        contrasts: the primary contrasts; Holm's correction runs across ``streams`` per contrast.
    """

    table: str
    plan: str
    streams: tuple[str, ...]
    reference: str
    contrasts: tuple[Contrast, ...]

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "plan": self.plan, "streams": list(self.streams), "reference": self.reference,
                "contrasts": [contrast.__dict__ for contrast in self.contrasts]}


def parse_protocol(entries: Sequence[dict[str, Any]], plans: dict[str, dict], source: str) -> list[Family]:
    """The ``protocol`` section as :class:`Family` objects, checked against the plans.

    Args:
        entries: the section: one mapping per table with ``table``, ``plan``, ``streams``
            (default: the plan's), ``reference`` and ``contrasts`` (``method``, ``reference``, ``claim``).
        plans: the suite's plans.
        source: the config's name, for error messages.

    Returns:
        One family per entry.

    Raises:
        ValueError: an unknown plan, a stream outside the plan, a method or reference the plan
            does not run, a table without contrasts, or a stream in two tables of one plan.
    """
    families, seen = [], {}
    for entry in entries:
        table = entry.get("table", "?")
        plan = plans.get(entry.get("plan"))
        if plan is None:
            raise ValueError(f"{source}: protocol table {table!r}: plan {entry.get('plan')!r} is not a plan; "
                             f"known: {sorted(plans)}")
        streams = tuple(entry.get("streams") or plan["streams"])
        outside = [stream for stream in streams if stream not in plan["streams"]]
        if outside:
            raise ValueError(f"{source}: protocol table {table!r}: streams {outside} are not in plan "
                             f"{entry['plan']!r} ({plan['streams']})")
        if not entry.get("contrasts"):
            raise ValueError(f"{source}: protocol table {table!r} declares no contrasts")
        incomplete = [c for c in entry["contrasts"] if not {"method", "reference", "claim"} <= set(c)]
        if incomplete:
            raise ValueError(f"{source}: protocol table {table!r}: a contrast needs method, reference and claim, "
                             f"got {incomplete[0]}")
        contrasts = tuple(Contrast(c["method"], c["reference"], c["claim"]) for c in entry["contrasts"])
        named = [entry.get("reference")] + [name for c in contrasts for name in (c.method, c.reference)]
        missing = [name for name in named if name not in plan["methods"]]
        if missing:
            raise ValueError(f"{source}: protocol table {table!r} names {missing[0]!r}, which plan {entry['plan']!r} "
                             f"does not run; its methods: {plan['methods']}")
        for stream in streams:
            other = seen.setdefault((entry["plan"], stream), table)
            if other != table:
                raise ValueError(f"{source}: stream {stream!r} of plan {entry['plan']!r} is in tables {other!r} "
                                 f"and {table!r}; a stream's report has one reference")
        families.append(Family(table, entry["plan"], streams, entry["reference"], contrasts))
    return families


def without_validation(method: dict[str, Any]) -> dict[str, Any]:
    """The method spec with the validated schedule taken out (what its unvalidated twin must be)."""
    return {**method, "with": [name for name in method.get("with", []) if name != "validated"]}


def check_validated_twins(plans: dict[str, dict], methods: dict[str, dict], source: str) -> None:
    """Every method of a plan that uses the validated schedule must have its twin without it in the plan.

    Raises:
        ValueError: naming the plan and the method without a twin.
    """
    normal = {name: without_validation(spec) for name, spec in methods.items()}
    for plan_name, plan in plans.items():
        for name in plan["methods"]:
            if "validated" not in methods[name].get("with", []):
                continue
            twins = [other for other in plan["methods"]
                     if "validated" not in methods[other].get("with", []) and normal[other] == normal[name]]
            if not twins:
                raise ValueError(f"{source}: plan {plan_name!r} runs {name!r} with the validated schedule but no "
                                 "method that is the same without it; add that method to the plan")


# --------------------------------------------------------------------------- tuning


def grid_points(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of a grid, in a fixed order (the cartesian product, keys sorted)."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def check_grids(grids: dict[str, dict], methods: Sequence[str], allowed: Callable[[str], set[str]], source: str) -> int:
    """Check that every tuned method has a grid, of one common size, over keys it takes.

    Args:
        grids: ``{method: {hyper-parameter: [values]}}``.
        methods: the methods a tuning plan runs.
        allowed: a method's tunable keys (``lr`` and its strategy's arguments).
        source: the config's name, for error messages.

    Returns:
        The common grid size.

    Raises:
        ValueError: a method without a grid, an unknown key, or grids of different sizes.
    """
    sizes = {}
    for method in methods:
        grid = grids.get(method)
        if not grid:
            raise ValueError(f"{source}: tuning.grids has no grid for method {method!r}")
        unknown = sorted(set(grid) - allowed(method))
        if unknown:
            raise ValueError(f"{source}: tuning.grids.{method}: {unknown[0]!r} is not tunable for this method; "
                             f"allowed: {sorted(allowed(method))}")
        sizes[method] = len(grid_points(grid))
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{source}: tuning grids must have the same number of points for every method, got {sizes}")
    return next(iter(sizes.values()))


def select_points(runs: dict[str, dict[int, Sequence["MethodResult"]]], grids: dict[str, dict]) -> dict[str, Any]:
    """Each method's best grid point by its validation average (mean over seeds).

    Args:
        runs: ``{method: {grid point index: [results, one per seed]}}`` on the development
            stream (whose test set is the validation split).
        grids: the methods' grids.

    Returns:
        ``{method: {"grid": [points], "scores": [mean average or None], "chosen": point,
        "chosen_index": i, "metric": ...}}``: the highest average for accuracies, the lowest
        for losses; ties go to the earlier point.

    Raises:
        ValueError: a method whose grid has a point with no finished run.
    """
    chosen = {}
    for method, by_point in sorted(runs.items()):
        points = grid_points(grids[method])
        missing = [i for i in range(len(points)) if not by_point.get(i)]
        if missing:
            raise ValueError(f"tuning: method {method!r} has no finished run for grid point(s) {missing}; "
                             "run the tuning plan to the end first")
        scores = [stats.fmean(result.summary["average"] for result in by_point[i]) for i in range(len(points))]
        higher = by_point[0][0].higher_is_better
        best = max(range(len(points)), key=lambda i: (scores[i] if higher else -scores[i], -i))
        chosen[method] = {"grid": points, "scores": scores, "chosen": points[best], "chosen_index": best,
                          "metric": f"validation {by_point[0][0].score_name} average, "
                                    f"{'higher' if higher else 'lower'} is better, mean over seeds"}
    return chosen


# --------------------------------------------------------------------------- compute


def nominal_item_passes(epochs: int, items: float, buffer: int, replays: bool, fits: int) -> float:
    """Training item-passes of one experience: ``fits x epochs x (items + buffer if it replays)``.

    Each of a method's fits (Meta-KV distillation has two) counts as a pass over the
    experience's items plus a full replay buffer, which bounds what it trains.
    """
    return fits * epochs * (items + (buffer if replays else 0))


def fixed_compute_steps(budget: float, experiences: int, joint: bool, fits: int, batch_size: int) -> int:
    """Optimizer steps per fit that train ``budget`` item-passes per experience.

    Args:
        budget: item-passes per experience every method gets (the plan's most expensive
            method's :func:`nominal_item_passes`).
        experiences: experiences in the stream (joint training fits them all at once).
        joint: the method trains once on every experience.
        fits: the method's fits per experience (each gets an equal share).
        batch_size: items per step.

    Returns:
        ``ceil(budget x (experiences if joint else 1) / (fits x batch_size))``.
    """
    return math.ceil(budget * (experiences if joint else 1) / (fits * batch_size))


# --------------------------------------------------------------------------- contrasts in the report


def contrast_differences(family: Family, runs: dict[str, dict[str, dict[int, "MethodResult"]]],
                         label: Callable[[str], str] = str) -> list[dict[str, Any]]:
    """Each contrast's paired bootstrap difference on every stream, Holm-adjusted across the streams.

    Args:
        family: the table.
        runs: ``{stream: {method label: {seed: result}}}``.
        label: a plan method's label in the results (the fixed-compute arm adds a suffix).

    Returns:
        One entry per contrast: its fields and ``streams``: ``{stream: {"seeds": [...], figure:
        interval JSON with "p_holm"}}`` over the seeds where both methods finished (streams where
        none did are left out). The Holm family of a figure is that contrast on those streams.
    """
    from metakv_cl.statistics import BOOTSTRAP_FIGURES, holm, intervals_json, item_scores, paired_bootstrap

    out = []
    for contrast in family.contrasts:
        by_stream = {}
        for stream in family.streams:
            methods = runs.get(stream, {})
            mine, theirs = methods.get(label(contrast.method), {}), methods.get(label(contrast.reference), {})
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue
            difference = paired_bootstrap(item_scores([mine[s] for s in seeds]),
                                          item_scores([theirs[s] for s in seeds]))["difference"]
            by_stream[stream] = {"seeds": seeds, **intervals_json({"difference": difference})["difference"]}
        for figure in BOOTSTRAP_FIGURES:
            present = [stream for stream in by_stream if by_stream[stream][figure] is not None]
            adjusted = holm([by_stream[stream][figure]["p_value"] for stream in present])
            for stream, p_value in zip(present, adjusted):
                by_stream[stream][figure]["p_holm"] = p_value
        out.append({**contrast.__dict__, "table": family.table, "streams": by_stream})
    return out


def contrast_markdown(contrasts: Sequence[dict[str, Any]]) -> list[str]:
    """The contrasts section of the index page: one table per contrast (average, forgetting, BWT)."""
    lines = []
    for contrast in contrasts:
        lines += [f"### {contrast['table']}: {contrast['method']} minus {contrast['reference']}", "",
                  contrast["claim"], "",
                  "| stream | Δ average [95%] | p (Holm) | Δ forgetting [95%] | p (Holm) | Δ BWT [95%] | p (Holm) |",
                  "|---|---|---|---|---|---|---|"]
        for stream, figures in contrast["streams"].items():
            cells = []
            for figure in ("average", "forgetting", "bwt"):
                value = figures[figure]
                if value is None:
                    cells += ["–", "–"]
                else:
                    interval = f"{value['estimate']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
                    cells += [interval, f"{value['p_holm']:.3g}"]
            seeds = len(figures["seeds"])
            lines.append(f"| {stream} ({seeds} seed{'' if seeds == 1 else 's'}) | " + " | ".join(cells) + " |")
        if not contrast["streams"]:
            lines.append("| (no stream has both methods on the same seeds) | | | | | | |")
        lines.append("")
    return lines


def readme_contrasts(protocol: dict[str, Any], results_folder: str) -> str:
    """The README's results block: every declared contrast that ran, from ``protocol.json``.

    Args:
        protocol: the ``protocol.json`` that ``report`` wrote.
        results_folder: that folder, relative to the README (for the links).
    """
    ran = [contrast for contrast in protocol["contrasts"] if contrast["streams"]]
    lines = [f"From `{results_folder}/protocol.json`, written by `cl_suite.py report` (per-stream tables: "
             f"`{results_folder}/INDEX.md`). Differences with 95% paired-bootstrap intervals over seeds and test "
             "items; p-values Holm-adjusted across each contrast's streams.", ""]
    lines += contrast_markdown(ran) if ran else ["No declared contrast has both of its methods on the same seeds yet.", ""]
    missing = [f"{c['table']}: {c['method']} minus {c['reference']}" for c in protocol["contrasts"] if not c["streams"]]
    if missing:
        lines += ["Declared but not run yet: " + "; ".join(missing) + ".", ""]
    return "\n".join(lines)


def tuning_markdown(tuning: dict[str, Any] | None, grids: dict[str, dict]) -> list[str]:
    """The tuning section of the index page: each method's grid, and its choice once ``tune`` has run."""
    if not tuning:
        return ["No tuning.json in the runs dirs: the methods ran the config's values. The grids:", "",
                *(f"- {method}: {grid}" for method, grid in grids.items()), ""]
    lines = ["| model | method | grid | validation score per point | chosen |", "|---|---|---|---|---|"]
    for model, methods in tuning["chosen"].items():
        for method, entry in methods.items():
            scores = ", ".join(f"{score:.3f}" for score in entry["scores"])
            lines.append(f"| {model} | {method} | {grids.get(method, entry['grid'])} | {scores} | {entry['chosen']} |")
    return [*lines, ""]



# Scoring options a stream may set for its evaluations (ContinualLMModule's arguments of the same names).
SCORING_OPTIONS: dict[str, tuple] = {"exact_match": (True, False), "ranking": ("sum", "mean")}
LITERATURE_METRICS = ("accuracy", "exact_match")


def check_scoring(scoring: dict[str, Any], where: str) -> None:
    """A stream's ``scoring`` section: generative exact match beside ranking, and how ranking normalises.

    Raises:
        ValueError: an unknown key or value (named, with what is allowed).
    """
    if not isinstance(scoring, dict):
        raise ValueError(f"{where}: scoring must be a mapping of {sorted(SCORING_OPTIONS)}, got {scoring!r}")
    for key, value in scoring.items():
        if key not in SCORING_OPTIONS:
            raise ValueError(f"{where}: scoring.{key} is not a scoring option; known: {sorted(SCORING_OPTIONS)}")
        if value not in SCORING_OPTIONS[key] or type(value) is not type(SCORING_OPTIONS[key][0]):
            raise ValueError(f"{where}: scoring.{key} must be one of {list(SCORING_OPTIONS[key])}, got {value!r}")


@dataclass(frozen=True)
class LiteratureAnchor:
    """Published numbers of a setting that a plan reproduces as closely as the data allows, shown beside ours.

    Attributes:
        plan: the plan whose runs are compared.
        streams: the plan's streams the published figure averages over.
        source: the publication, and where in it the numbers are.
        model: the published model.
        metric: our figure: ``exact_match`` (generative) or ``accuracy`` (label ranking), the stream's
            final average, in percent, averaged over ``streams``.
        published: method -> the published figure (percent).
        names: method -> the method's name in the publication.
        differences: what differs between the published setting and ours (model, data, metric).
    """

    plan: str
    streams: tuple[str, ...]
    source: str
    model: str
    metric: str
    published: dict[str, float]
    names: dict[str, str]
    differences: str


def parse_literature(entries: Sequence[dict[str, Any]], plans: dict[str, dict], source: str) -> list[LiteratureAnchor]:
    """The ``literature`` section as :class:`LiteratureAnchor` objects, checked against the plans.

    Raises:
        ValueError: a missing field, an unknown plan, a stream or method its plan does not run, an
            unknown metric or a published figure outside [0, 100].
    """
    anchors = []
    for index, entry in enumerate(entries):
        where = f"{source}: literature[{index}]"
        missing = [key for key in ("plan", "source", "model", "metric", "published", "differences") if key not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        plan = plans.get(entry["plan"])
        if plan is None:
            raise ValueError(f"{where}: unknown plan {entry['plan']!r}; known: {sorted(plans)}")
        streams = tuple(entry.get("streams", plan["streams"]))
        for kind, named, ran in (("stream", streams, plan["streams"]), ("method", entry["published"], plan["methods"])):
            absent = [name for name in named if name not in ran]
            if absent:
                raise ValueError(f"{where}: {kind} {absent[0]!r} is not run by plan {entry['plan']!r} ({list(ran)})")
        if entry["metric"] not in LITERATURE_METRICS:
            raise ValueError(f"{where}: metric must be one of {list(LITERATURE_METRICS)}, got {entry['metric']!r}")
        for method, value in entry["published"].items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{where}: published[{method!r}] must be a percentage in [0, 100], got {value!r}")
        anchors.append(LiteratureAnchor(entry["plan"], streams, entry["source"], entry["model"], entry["metric"],
                                        {m: float(v) for m, v in entry["published"].items()},
                                        dict(entry.get("names", {})), entry["differences"]))
    return anchors


def literature_comparison(anchor: LiteratureAnchor,
                          runs: dict[str, dict[str, dict[int, "MethodResult"]]]) -> dict[str, Any]:
    """Our figure for each published method: per stream the mean over seeds, and the mean over the streams.

    Args:
        anchor: the published numbers.
        runs: ``{stream: {method: {seed: result}}}`` of one model.

    Returns:
        The anchor's fields and ``rows``: per method its published figure, ``ours`` (``{stream:
        {"mean", "std", "seeds"}}`` for the streams that ran) and ``ours_average`` (the mean over
        ``streams``; None until every stream ran).
    """
    from metakv_cl.metrics import continual_summary

    rows = []
    for method, published in anchor.published.items():
        ours = {}
        for stream in anchor.streams:
            values = []
            for result in runs.get(stream, {}).get(method, {}).values():
                matrix = result.exact_match_matrix if anchor.metric == "exact_match" else result.matrix
                if matrix is not None:
                    values.append(100.0 * continual_summary(matrix, True)["average"])
            if values:
                ours[stream] = {"mean": stats.fmean(values), "std": stats.stdev(values) if len(values) > 1 else None,
                                "seeds": len(values)}
        complete = len(ours) == len(anchor.streams)
        rows.append({"method": method, "name": anchor.names.get(method, method), "published": published,
                     "ours": ours, "ours_average": stats.fmean(v["mean"] for v in ours.values()) if complete else None})
    return {**anchor.__dict__, "streams": list(anchor.streams), "rows": rows}


def literature_markdown(comparisons: Sequence[dict[str, Any]]) -> list[str]:
    """The index page's section that places published numbers beside ours."""
    lines = []
    for comparison in comparisons:
        metric = "generative exact match" if comparison["metric"] == "exact_match" else "label-ranking accuracy"
        lines += ["## Beside the literature", "",
                  f"{comparison['source']}: {comparison['model']}. Ours: final average {metric} (%), mean ± std over "
                  f"seeds, on {', '.join(comparison['streams'])}. What differs: {comparison['differences']}", "",
                  "| method | published | ours, mean over the streams | " + " | ".join(comparison["streams"]) + " |",
                  "|---|---:|---:|" + "---:|" * len(comparison["streams"])]
        for row in comparison["rows"]:
            cells = [f"{mean_and_spread(row['ours'][s]['mean'], row['ours'][s]['std'], 1)} ({row['ours'][s]['seeds']})"
                     if s in row["ours"] else "not run" for s in comparison["streams"]]
            average = "–" if row["ours_average"] is None else f"{row['ours_average']:.1f}"
            label = row["method"] if row["name"] == row["method"] else f"{row['name']} (`{row['method']}`)"
            lines.append(f"| {label} | {row['published']:.1f} | {average} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
