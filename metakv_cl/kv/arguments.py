"""The options of ``metakv-cl kv-eval``, ``metakv-cl niah`` and ``metakv-cl ruler`` (:mod:`metakv_cl.kv.evaluate`).

Apart from the evaluation code, so that ``--help`` and a mistyped option answer before torch and
the models load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TINY_RANDOM_GPT2 = "gpt2-tiny-random"
SMOLLM2 = "smollm2"
DEFAULT_BUDGETS = (0.5, 0.2, 0.1, 0.05, 0.02)
PROTOCOLS = ("streaming", "oneshot")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SMOLLM2, help=f"{TINY_RANDOM_GPT2}, {SMOLLM2}, or a transformers name/path")
    parser.add_argument("--meta-kv", default=None, metavar="SOURCE", help="add Meta-KV attention with this meta-state source")
    parser.add_argument("--meta-kv-weights", default=None, metavar="DIR", help="load trained Meta-KV weights from DIR")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a constructor argument of a method (repeatable), e.g. attention_matching.selection=omp")
    parser.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS), help="cache sizes as fractions of the context")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per forward call (default: an eighth of the cache)")
    parser.add_argument("--headroom", type=float, default=0.1, help="share of the cache freed by each compaction")
    parser.add_argument("--reference-queries", type=int, default=1024, help="reference queries kept per KV head")
    parser.add_argument("--repeat-queries", action="store_true", help="re-read each chunk to capture extra reference queries")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="a text file (WikiText titles split it into articles), a folder of .txt articles, or a folder "
                             "holding wikitext2/valid.txt (default: the shared data folder)")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the JSON and PNG files go")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)


def kv_eval_parser() -> argparse.ArgumentParser:
    """The options of ``metakv-cl kv-eval``."""
    parser = argparse.ArgumentParser(
        prog="metakv-cl kv-eval", description="perplexity of long-text continuations against cache size"
    )
    _common_arguments(parser)
    parser.add_argument("--articles", type=int, default=2, help="articles read (as one batch)")
    parser.add_argument("--skip-articles", type=int, default=0,
                        help="long-enough articles passed over first (held-out articles for settings chosen on the first ones)")
    parser.add_argument("--context", type=int, default=2048, help="context tokens read through the cache")
    parser.add_argument("--continuation", type=int, default=256, help="continuation tokens scored")
    parser.add_argument("--protocol", default="streaming",
                        help="streaming (compact as the context streams in), oneshot (read the context, compact once, "
                             "score the continuation) or both, comma-separated: oneshot,streaming")
    return parser


def niah_parser() -> argparse.ArgumentParser:
    """The options of ``metakv-cl niah``."""
    parser = argparse.ArgumentParser(
        prog="metakv-cl niah", description="needle-in-a-haystack retrieval through compacted caches"
    )
    _common_arguments(parser)
    parser.add_argument("--lengths", default="1024,2048", help="haystack lengths in tokens (question included)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=4, help="haystacks per length and depth (one batch)")
    return parser


def ruler_parser() -> argparse.ArgumentParser:
    """The options of ``metakv-cl ruler``."""
    parser = argparse.ArgumentParser(
        prog="metakv-cl ruler", description="RULER-style task accuracy through one-shot compacted caches"
    )
    _common_arguments(parser)
    parser.add_argument("--tasks", default="all",
                        help="comma-separated tasks (niah_single, niah_multikey, niah_multivalue, variable_tracking, "
                             "common_words_extraction), or 'all'")
    parser.add_argument("--lengths", default="4096", help="tokens of context plus question, comma-separated")
    parser.add_argument("--examples", type=int, default=10, help="examples per task and length")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                        help="needle depths in [0, 1], example i taking the (i mod count)-th")
    parser.add_argument("--question-aware", action="store_true",
                        help="read the question (all but its last token) before compacting, so the methods that "
                             "rank by attention see the question's queries (SnapKV's own setting: its window is "
                             "the question); default: question-agnostic, the question comes after the compaction")
    return parser
