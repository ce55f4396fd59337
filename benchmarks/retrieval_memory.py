"""Retrieval memories against compacted caches: perplexity vs memory bytes on long WikiText-2 articles (issue 18).

Every method reads the first ``--tokens`` tokens of ``--articles`` held-out WikiText-2 validation
articles (the first ones that long) and scores the last ``--score-tokens`` of them; the model
attends to about ``--budget`` tokens at a time (plus the chunk being read):

* ``full``: the full cache (the reference; its bytes grow with the input);
* one row per compaction method of ``--methods``: a :class:`~metakv_cl.kv.cache.CompactedCache`
  of ``--budget`` tokens, read ``--chunk`` tokens per forward call;
* ``knn_attention``: :class:`~metakv_cl.kv.retrieval.knn_attention.KNNMemoryCache` over
  ``--knn-method`` at the same budget, every evicted entry kept in the memory, each query
  attending to its ``--knn-top-k`` retrieved entries in one softmax with the local ones;
* ``knn_lm``: :class:`~metakv_cl.kv.retrieval.knn_lm.KNNLM` over the article's text before the
  scored part (windows of ``--budget`` tokens), mixed with the LM read through the
  ``--knn-method`` cache;
* ``rag``: :func:`~metakv_cl.kv.retrieval.rag.rag_log_likelihood`, ``--rag-top-k`` chunks of
  ``--rag-chunk`` tokens retrieved from the article's past for the latest
  ``budget - top_k * chunk`` tokens, in strides of ``--chunk`` tokens.

Memory bytes: ``kv_bytes`` is the peak of the KV cache the model attends to (for RAG, the
longest context read, at the model's bytes per token), ``store_bytes`` what the retrieval memory
holds beside it (kNN attention: evicted keys and values plus their index vectors; kNN-LM: the
contexts and next tokens; RAG: chunk tokens and embeddings), ``memory_bytes`` their sum.
``retrieval_seconds`` is the time spent in FAISS searches (kNN attention) and
``seconds_per_token`` the wall time per token read.

Writes ``--out`` (JSON: command, commit, date, versions, settings, one row per method and
article, and the mean per method). SmolLM2-135M on 2 CPU cores, the committed defaults, takes
a few minutes::

    HF_HUB_OFFLINE=1 python benchmarks/retrieval_memory.py --out benchmarks/results/retrieval_memory_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import metakv_cl  # noqa: F401  (the torchvision import fix must run before transformers' models)
import torch

from metakv_cl.benchmarks.long_context import MODELS, SMOLLM2, load_base, read_articles, run_metadata
from metakv_cl.kv import CompactedCache, chunked_prefill, stream_log_likelihood
from metakv_cl.kv.retrieval.knn_attention import KNNMemoryCache
from metakv_cl.kv.retrieval.knn_lm import KNNLM, knn_lm_log_likelihood
from metakv_cl.kv.retrieval.rag import ChunkRetriever, MeanPooledEmbedder, rag_log_likelihood


def kv_bytes_per_token(model: torch.nn.Module, device: str) -> int:
    """Bytes one token takes in the model's full-precision KV cache (all layers, K and V)."""
    cache = CompactedCache("full", config=model.config)
    chunked_prefill(model, cache, torch.ones(1, 1, dtype=torch.long, device=device), chunk_size=1)
    return cache.nbytes


def held_out_articles(articles: Sequence[str], encode: Callable[[str], list[int]], tokens: int, count: int) -> list[torch.Tensor]:
    """The first ``tokens`` tokens of the first ``count`` articles that long.

    Raises:
        ValueError: fewer than ``count`` articles have ``tokens`` tokens.
    """
    chosen = []
    for article in articles:
        ids = encode(article)
        if len(ids) >= tokens:
            chosen.append(torch.tensor(ids[:tokens]))
            if len(chosen) == count:
                return chosen
    raise ValueError(f"only {len(chosen)} articles have {tokens} tokens; lower --tokens or --articles")


def measure(name: str, family: str, score: Callable[[], tuple[float, int]], bytes_of: Callable[[], dict[str, int]],
            tokens: int) -> dict[str, Any]:
    """Run one scoring, time it and describe it as a result row."""
    started = time.perf_counter()
    nll, count = score()
    seconds = time.perf_counter() - started
    memory = bytes_of()
    return {"method": name, "family": family, "perplexity": math.exp(nll / count), "scored_tokens": count,
            **memory, "memory_bytes": memory["kv_bytes"] + memory["store_bytes"], "seconds": seconds,
            "seconds_per_token": seconds / tokens}


def article_rows(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, token_bytes: int) -> Iterator[dict[str, Any]]:
    """Every method's row on one article (``ids`` [tokens]), each as soon as it is measured."""
    device, config = args.device, model.config
    text = ids.unsqueeze(0).to(device)
    score_from = ids.shape[0] - args.score_tokens

    def streamed(cache: CompactedCache) -> Callable[[], tuple[float, int]]:
        def score():
            nll, count, _ = stream_log_likelihood(model, cache, text, score_from=score_from, chunk_size=args.chunk)
            return nll, count
        return score

    full = CompactedCache("full", config=config)
    yield measure("full", "reference", streamed(full), lambda: {"kv_bytes": full.peak_bytes, "store_bytes": 0}, len(ids))
    for method in args.methods.split(","):
        cache = CompactedCache(method, args.budget, config=config)
        yield measure(method, "compacted cache", streamed(cache),
                      lambda cache=cache: {"kv_bytes": cache.peak_bytes, "store_bytes": 0}, len(ids))

    memory_layers = None if args.knn_layers == "all" else [int(i) for i in args.knn_layers.split(",")]
    knn_cache = KNNMemoryCache(args.knn_method, args.budget, config=config, top_k=args.knn_top_k, memory_layers=memory_layers)
    row = measure("knn_attention", "retrieval", streamed(knn_cache),
                  lambda: {"kv_bytes": knn_cache.peak_bytes, "store_bytes": knn_cache.memory_nbytes}, len(ids))
    yield {**row, "retrieval_seconds": knn_cache.stats()["retrieval_seconds"]}

    knn_lm = KNNLM.from_corpus(model, [ids[:score_from].to(device)], window=args.budget, interpolation=args.knn_lm_lambda,
                               temperature=args.knn_lm_temperature, k=args.knn_lm_k)
    lm_cache = CompactedCache(args.knn_method, args.budget, config=config)
    yield measure(
        "knn_lm", "retrieval",
        lambda: knn_lm_log_likelihood(model, knn_lm, text, cache=lm_cache, chunk_size=args.chunk, score_from=score_from),
        lambda: {"kv_bytes": lm_cache.peak_bytes, "store_bytes": knn_lm.nbytes}, len(ids))

    local_tokens = args.budget - args.rag_top_k * args.rag_chunk
    retriever = ChunkRetriever(MeanPooledEmbedder(model), chunk_size=args.rag_chunk, top_k=args.rag_top_k)
    yield measure(
        "rag", "retrieval",
        lambda: rag_log_likelihood(model, text, retriever, local_tokens=local_tokens, stride=args.chunk, score_from=score_from),
        lambda: {"kv_bytes": (args.budget + args.chunk) * token_bytes, "store_bytes": retriever.nbytes}, len(ids))


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean perplexity, memory bytes and seconds per token over the articles."""
    methods = dict.fromkeys(row["method"] for row in rows)
    table = []
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        table.append({"method": method, "family": mine[0]["family"], "articles": len(mine),
                      **{key: statistics.fmean(row[key] for row in mine)
                         for key in ("perplexity", "kv_bytes", "store_bytes", "memory_bytes", "seconds_per_token")}})
    return table


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--model", default=SMOLLM2, choices=MODELS)
    parser.add_argument("--wikitext", type=Path, default=None, help="WikiText file (default: the shared wikitext2/valid.txt)")
    parser.add_argument("--articles", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens read per article")
    parser.add_argument("--score-tokens", type=int, default=384, help="last tokens scored")
    parser.add_argument("--budget", type=int, default=256, help="tokens the model attends to (cache size, RAG context)")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per forward call (RAG: per stride)")
    parser.add_argument("--methods", default="sinks_window,h2o,attention_matching", help="compaction methods compared")
    parser.add_argument("--knn-method", default="sinks_window", help="compaction method under kNN attention and kNN-LM")
    parser.add_argument("--knn-top-k", type=int, default=32, help="entries each query retrieves")
    parser.add_argument("--knn-layers", default="all", help="layers with a kNN memory: all, or comma-separated indices")
    parser.add_argument("--knn-lm-lambda", type=float, default=0.25)
    parser.add_argument("--knn-lm-temperature", type=float, default=10.0, help="divides the squared L2 distances")
    parser.add_argument("--knn-lm-k", type=int, default=16)
    parser.add_argument("--rag-chunk", type=int, default=64, help="tokens per retrieved chunk")
    parser.add_argument("--rag-top-k", type=int, default=2, help="chunks retrieved per stride")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not 0 < args.score_tokens < args.tokens:
        parser.error(f"--score-tokens must be in (0, --tokens={args.tokens}), got {args.score_tokens}")
    if args.rag_top_k * args.rag_chunk >= args.budget:
        parser.error(f"--rag-top-k * --rag-chunk ({args.rag_top_k * args.rag_chunk}) must leave local tokens in --budget ({args.budget})")
    if args.budget > args.tokens - args.score_tokens:
        parser.error(f"--budget ({args.budget}) must fit in the unscored prefix ({args.tokens - args.score_tokens} tokens)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = run_metadata(argv, args)  # before the run: the commit recorded is the code that runs
    meta["command"] = shlex.join(["python", "benchmarks/retrieval_memory.py", *argv])
    torch.manual_seed(0)
    model, encode = load_base(args.model, args.device)
    articles = held_out_articles(read_articles(args), encode, args.tokens, args.articles)
    token_bytes = kv_bytes_per_token(model, args.device)
    rows = []
    for index, ids in enumerate(articles):
        for row in article_rows(model, ids, args, token_bytes):
            rows.append({"article": index, **row})
            print(f"article {index} {row['method']:>20}: perplexity {row['perplexity']:.3f}, memory {row['memory_bytes']} bytes, "
                  f"{row['seconds_per_token'] * 1e3:.1f} ms/token", flush=True)
    report = {**meta, "kv_bytes_per_token": token_bytes, "summary": summary(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
