"""Markdown tables of ``metakv-cl kv-eval`` results: perplexity and cache size per method and budget, from the JSON.

Each argument names a ``kv_eval.json`` and, optionally, one method of it and the row's label::

    python benchmarks/kv_eval_table.py results/a/kv_eval.json#full results/b/kv_eval.json#h2o \\
        "results/c/kv_eval.json#dynamic_precision_am=dynamic_precision_am (no summary)"

A method that ran at budget 1 only (the full cache) is repeated in every column. The lowest
perplexity of each budget (the full cache aside) is in bold; below the tables, which method
that is, its gap to the full cache, and whether issue 20's target holds (one method lowest at
every budget and within ``--within`` of the full cache at ``--at``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from metakv_cl.report import _markdown_table


def load_rows(spec: str) -> tuple[str, dict[float, dict[str, Any]]]:
    """(label, {budget: row}) of ``PATH[#METHOD[=LABEL]]`` (without a method: the file's only one)."""
    path, _, selection = spec.partition("#")
    method, _, label = selection.partition("=")
    rows = [r for r in json.loads(Path(path).read_text())["results"] if "skipped" not in r]
    methods = sorted({r["method"] for r in rows})
    if not method:
        if len(methods) != 1:
            raise ValueError(f"{path} holds {methods}: name one as {path}#METHOD")
        method = methods[0]
    chosen = {float(r["budget"]): r for r in rows if r["method"] == method}
    if not chosen:
        raise ValueError(f"{path} has no rows of {method!r} (it has {methods})")
    return label or method, chosen


def tables(specs: Sequence[str], at: float = 0.1, within: float = 0.05) -> str:
    """The perplexity and cache-size tables and the verdict of ``specs`` (see the module docstring)."""
    runs = [load_rows(spec) for spec in specs]
    budgets = sorted({b for _, rows in runs for b in rows if b < 1.0}, reverse=True)
    full = next((rows[1.0] for _, rows in runs if set(rows) == {1.0}), None)

    def row_at(rows: dict[float, dict[str, Any]], budget: float) -> dict[str, Any] | None:
        return rows.get(1.0) if set(rows) == {1.0} else rows.get(budget)

    best: dict[float, str] = {}
    for budget in budgets:
        scored = [(row["perplexity"], label) for label, rows in runs if set(rows) != {1.0}
                  for row in [row_at(rows, budget)] if row is not None]
        if scored:
            best[budget] = min(scored)[1]

    def cell(label: str, rows: dict[float, dict[str, Any]], budget: float, key: str, digits: int) -> str:
        row = row_at(rows, budget)
        if row is None:
            return "–"
        text = f"{row[key]:.{digits}f}"
        return f"**{text}**" if key == "perplexity" and best.get(budget) == label else text

    header = ["method", *[f"{b:g}" for b in budgets]]
    perplexity = _markdown_table(header, [[label, *[cell(label, rows, b, "perplexity", 2) for b in budgets]]
                                          for label, rows in runs])
    size = _markdown_table(header, [[label, *[cell(label, rows, b, "cache_fraction_of_full", 4) for b in budgets]]
                                    for label, rows in runs])
    lines = []
    for budget in budgets:
        label = best[budget]
        value = row_at(dict(runs)[label], budget)["perplexity"]
        gap = "" if full is None else f", {100 * (value / full['perplexity'] - 1):+.1f} % against the full cache"
        lines.append(f"- {budget:g}: {label} ({value:.2f}{gap})")
    winners = set(best.values())
    verdict = [f"One method lowest at every budget: {'yes, ' + next(iter(winners)) if len(winners) == 1 else 'no'}."]
    if full is not None and at in best:
        value = row_at(dict(runs)[best[at]], at)["perplexity"]
        met = value <= (1 + within) * full["perplexity"]
        verdict.append(f"Lowest at {at:g} within {100 * within:g} % of the full cache ({(1 + within) * full['perplexity']:.2f}): "
                       f"{'yes' if met else 'no'} ({best[at]}, {value:.2f}).")
    return "\n".join([
        "Perplexity (lowest of each budget in bold):", "", perplexity, "",
        "Cache size as a fraction of the full cache (keys, values and bias; what kv-eval measured):", "", size, "",
        "Lowest perplexity per budget:", "", *lines, "", *verdict,
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="PATH[#METHOD[=LABEL]] of a kv_eval.json")
    parser.add_argument("--at", type=float, default=0.1, help="budget of the target's gap to the full cache")
    parser.add_argument("--within", type=float, default=0.05, help="the target's largest gap to the full cache")
    args = parser.parse_args(argv)
    print(tables(args.runs, args.at, args.within))
    return 0


if __name__ == "__main__":
    sys.exit(main())
