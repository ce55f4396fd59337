"""Compacted KV caches on long texts: a thin wrapper around ``metakv-cl kv-eval``, ``niah`` and ``ruler``.

Run as ``python -m metakv_cl.benchmarks.kv_eval [kv-eval options]`` for the perplexity sweep,
``python -m metakv_cl.benchmarks.kv_eval niah [niah options]`` for needle in a haystack, or
``python -m metakv_cl.benchmarks.kv_eval ruler [ruler options]`` for RULER-style tasks; see
:mod:`metakv_cl.kv.evaluate` for the options. The measured SmolLM2-135M table of the project was
made with::

    python -m metakv_cl.benchmarks.kv_eval --model smollm2 --articles 2 --context 2048 \\
        --continuation 256 --budgets 0.5,0.2,0.1,0.05,0.02 --out-dir benchmarks/results/kv
"""

from __future__ import annotations

import sys

from metakv_cl.kv.evaluate import main, niah_main, ruler_main


def run(argv: list[str]) -> int:
    """Dispatch ``niah ...`` and ``ruler ...`` to their benchmarks and anything else to the perplexity sweep."""
    if argv and argv[0] == "niah":
        return niah_main(argv[1:])
    if argv and argv[0] == "ruler":
        return ruler_main(argv[1:])
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
