"""Which layers carry Attention Matching's perplexity gap to H2O in one-shot compaction (issue 20).

The context is read once per method with a full cache (as ``kv-eval --protocol oneshot``) and
compacted to one budget by H2O and by Attention Matching; then, one layer at a time, the
continuation is scored through the Attention Matching cache with that one layer taken from the
H2O cache (and the other way round). A layer where the swap lowers the continuation's
negative log-likelihood is one where AM's compacted block costs more than H2O's. Rows to JSON,
a summary to stdout::

    python benchmarks/am_layer_swap.py --articles 2 --budget 0.1 --out benchmarks/results/am_layer_swap.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from metakv_cl.benchmarks.am_fit_diagnostics import add_article_arguments, model_and_windows
from metakv_cl.kv.evaluate import RunSettings, oneshot_prefill, parse_method_options
from metakv_cl.kv.streaming import continuation_log_likelihood


def swapped(base, donor, layers):
    """A copy of compacted cache ``base`` whose ``layers`` are copies of ``donor``'s."""
    cache = copy.deepcopy(base)
    for index in layers:
        layer = copy.deepcopy(donor.layers[index], memo={id(donor): cache})
        # H2O's cache keeps accumulating attention while the continuation is read (not used again).
        layer.importance = torch.zeros(layer.keys.shape[:3]) if cache.method.tracks_attention else None
        cache.layers[index] = layer
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_article_arguments(parser)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--am-option", action="append", default=[], help="KEY=VALUE for attention_matching (Python literal)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        options = parse_method_options([f"attention_matching.{option}" for option in args.am_option])
    except ValueError as error:
        parser.error(str(error))

    model, ids = model_and_windows(args)
    context, continuation = ids[:, : args.context], ids[:, args.context :]
    settings = RunSettings(None, 0.1, 1024, False, options)
    caches = {}
    with torch.no_grad():
        for method in ("h2o", "attention_matching"):
            prefill = oneshot_prefill(model, context, method, settings, follow=args.continuation)
            caches[method] = (prefill.compacted(args.budget)[0], prefill.last_logits)
    last_logits = caches["h2o"][1]
    tokens = continuation.numel()

    def nll(cache) -> float:
        with torch.no_grad():
            total, scored = continuation_log_likelihood(model, cache, last_logits, continuation, chunk_size=512)
        return total / scored

    am, h2o = caches["attention_matching"][0], caches["h2o"][0]
    rows = [{"swap": "none", "base": "attention_matching", "nll": nll(copy.deepcopy(am))},
            {"swap": "none", "base": "h2o", "nll": nll(copy.deepcopy(h2o))}]
    print(f"AM {math.exp(rows[0]['nll']):.3f}  H2O {math.exp(rows[1]['nll']):.3f}", flush=True)
    for index in range(len(am.layers)):
        started = time.perf_counter()
        into_am = nll(swapped(am, h2o, [index]))
        into_h2o = nll(swapped(h2o, am, [index]))
        rows.append({"swap": index, "base": "attention_matching", "nll": into_am})
        rows.append({"swap": index, "base": "h2o", "nll": into_h2o})
        print(f"layer {index:2d}: AM with H2O's layer {into_am - rows[0]['nll']:+.4f} nats/token, "
              f"H2O with AM's layer {into_h2o - rows[1]['nll']:+.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/am_layer_swap.py " + " ".join(argv or sys.argv[1:]),
                                    "config": {k: str(v) for k, v in vars(args).items()}, "scored_tokens": tokens,
                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
