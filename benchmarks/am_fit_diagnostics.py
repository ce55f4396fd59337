"""Per-layer attention error of one-shot compaction on the continuation's own queries (issue 20).

Perplexity says whether a compaction works; this says where it fails. The context and its
continuation are read once with every query captured; then, per layer, the context's keys and
values are compacted by each method (with the reference queries and the causal accumulated
attention the one-shot cache would give it) and the continuation's queries are run over the
compacted block and over the original one. Reported per method, budget and layer: the mean
absolute error of the block's log attention mass and the relative error of its attention
output (the two things Attention Matching fits), to JSON, and the layer means to stdout::

    python benchmarks/am_fit_diagnostics.py --articles 2 --methods h2o,attention_matching,h2o_refit \\
        --budgets 0.5,0.2,0.1,0.05,0.02 --out benchmarks/results/am_fit_diagnostics_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import torch

from metakv_cl.kv import CompactedCache, chunked_prefill, get_method
from metakv_cl.kv.evaluate import article_windows, load_model, long_articles
from metakv_cl.kv.methods.attention_matching import attention_outputs


def block_errors(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, compacted) -> tuple[float, float]:
    """(mean |log-mass error|, relative output error) of a compacted block against the original, on ``queries``."""
    log_mass, output = attention_outputs(queries, keys, values)
    compact_mass, compact_output = attention_outputs(queries, compacted.keys, compacted.values, compacted.bias)
    output_error = (compact_output - output).norm(dim=-1).mean() / output.norm(dim=-1).mean()
    return float((compact_mass - log_mass).abs().mean()), float(output_error)


def causal_accumulated_attention(keys: torch.Tensor, queries: torch.Tensor, groups: int) -> torch.Tensor:
    """H2O's statistic after a prefill: attention each key received from the queries at or after it [b, h, tokens]."""
    tokens = keys.shape[-2]
    row_token = torch.arange(queries.shape[-2]) // groups
    future = torch.arange(tokens) > row_token.unsqueeze(-1)
    scores = (queries @ keys.transpose(-1, -2)).masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=-2)


def spread_queries(queries: torch.Tensor, groups: int, room: int) -> torch.Tensor:
    """Every ``stride``-th token's queries, the smallest power-of-two stride that fits ``room`` rows (as the cache keeps them)."""
    batch, heads, rows, dim = queries.shape
    per_token = queries.reshape(batch, heads, rows // groups, groups, dim)
    stride = 1
    while -(-per_token.shape[2] // stride) * groups > room:
        stride *= 2
    return per_token[:, :, ::stride].reshape(batch, heads, -1, dim)


def method_from_spec(spec: str):
    """``h2o_refit:fit_values=False`` -> ``get_method("h2o_refit", fit_values=False)``."""
    name, *options = spec.split(":")
    return get_method(name, **{key: ast.literal_eval(value) for key, value in (o.split("=", 1) for o in options)})


def add_article_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the WikiText-2 windows a study reads: ``--model --articles --context --continuation``."""
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--articles", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)


def model_and_windows(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model of ``--model`` and the first ``--articles`` long articles' context + continuation ids, as kv-eval reads them."""
    model, tokenizer = load_model(args.model)
    return model, article_windows(tokenizer, long_articles(None), args.context + args.continuation, args.articles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_article_arguments(parser)
    parser.add_argument("--reference-queries", type=int, default=1024, help="reference queries per KV head, as kv-eval")
    parser.add_argument("--methods", default="h2o,attention_matching,h2o_refit",
                        help="comma-separated METHOD or METHOD:KEY=VALUE:KEY=VALUE (options as Python literals)")
    parser.add_argument("--budgets", default="0.5,0.2,0.1,0.05,0.02")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    methods, budgets = args.methods.split(","), [float(b) for b in args.budgets.split(",")]

    model, ids = model_and_windows(args)
    total = ids.shape[1]
    capture = CompactedCache("attention_matching", None, config=model.config, reference_queries=4 * total * 64)
    with torch.no_grad():
        chunked_prefill(model, capture, ids, chunk_size=512)
    compressors = {method: method_from_spec(method) for method in methods}
    repeated = None  # the context read after itself: the queries of reference="repeat" (repeat-prefill)
    if any(c.reference == "repeat" for c in compressors.values()):
        context_ids = ids[:, : args.context]
        repeated = CompactedCache("attention_matching", None, config=model.config, reference_queries=4 * total * 64)
        with torch.no_grad():
            chunked_prefill(model, repeated, torch.cat([context_ids, context_ids], dim=1), chunk_size=512)
    rows = []
    for index, layer in enumerate(capture.layers):
        groups = layer.query_groups
        keys, values = layer.keys[..., : args.context, :].float(), layer.values[..., : args.context, :].float()
        queries = layer.reference_queries
        if queries.shape[-2] != total * groups:
            raise ValueError(f"layer {index} captured {queries.shape[-2]} queries, expected {total * groups}")
        context_queries, continuation_queries = queries[:, :, : args.context * groups], queries[:, :, args.context * groups :]
        references = {"context": spread_queries(context_queries, groups, args.reference_queries)}
        if repeated is not None:
            second = repeated.layers[index].reference_queries[:, :, args.context * groups :]
            references["repeat"] = spread_queries(second, groups, args.reference_queries)
        importance = causal_accumulated_attention(keys, context_queries, groups)
        for method in methods:
            compressor = compressors[method]
            for budget in budgets:
                compacted = compressor.compact(keys, values, references[compressor.reference], budget,
                                               importance=importance, query_groups=groups)
                mass_error, output_error = block_errors(continuation_queries, keys, values, compacted)
                rows.append({"layer": index, "method": method, "budget": budget,
                             "log_mass_error": mass_error, "output_error": output_error})
        print(f"layer {index} done", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/am_fit_diagnostics.py " + " ".join(argv or sys.argv[1:]),
                                    "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print("mean over layers: output error (log-mass error)")
    for method in methods:
        cells = []
        for budget in budgets:
            picked = [r for r in rows if r["method"] == method and r["budget"] == budget]
            cells.append(f"{budget:g}: {sum(r['output_error'] for r in picked) / len(picked):.3f} "
                         f"({sum(r['log_mass_error'] for r in picked) / len(picked):.3f})")
        print(f"{method:>20}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
