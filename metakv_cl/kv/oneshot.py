"""One-shot compaction: read a context with a full cache, compact it once, then ask questions of it.

The protocol of Zweiger et al., "Fast KV Compaction via Attention Matching" (2026), and of the
kvpress presses, in three lines::

    with compaction(model, "attention_matching", budget=0.1) as cache:
        model(context_ids)                      # the prefill fills `cache`, nothing is compacted yet
    answer = generate(model, cache, question_ids, max_new_tokens=20)   # metakv_cl.kv.generate

Inside the block, every forward call of ``model`` that passes no cache of its own reads into
``cache`` (an unbounded :class:`~metakv_cl.kv.cache.CompactedCache`), which captures what the
method needs: the reference queries for Attention Matching, SnapKV and PyramidKV, the attention
statistics for H2O, TOVA and dynamic precision. On leaving the block, every layer is compacted
at once to ``budget`` (:meth:`CompactedCache.compact`); an exception inside the block leaves
the cache uncompacted. Continue from the cache with :func:`~metakv_cl.kv.streaming.generate`
or :meth:`CompactedCache.position_ids`, which give the new tokens their true positions (a
plain ``model(question, past_key_values=cache)`` would count positions from the compacted size).

What each family of methods needs from the prefill:

* Attention Matching: reference queries, ``reference_queries`` of them per KV head, spread
  over the whole context by default (its ``query_sampling``); with ``reference="repeat"``, the
  block re-reads the context after itself on exit (:func:`~metakv_cl.kv.streaming.repeat_prefill`)
  and takes the queries from that second reading;
* SnapKV, PyramidKV: the queries of the last ``window`` tokens (the observation window);
* H2O, dynamic precision, TOVA: the attention each entry receives, tracked during the prefill
  (the attention weights are computed explicitly, so the prefill is slower than sdpa);
* the others (windows, sinks, random, quantization, merges): nothing.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from metakv_cl.kv.cache import CompactedCache
from metakv_cl.kv.protocol import KVCompressor, validate_budget
from metakv_cl.kv.streaming import repeat_prefill
from metakv_cl.transformers_api import cache_argument_name, passed_cache


@contextmanager
def compaction(
    model: torch.nn.Module,
    method: str | KVCompressor,
    budget: float,
    *,
    reference_queries: int = 1024,
    **method_options: Any,
) -> Iterator[CompactedCache]:
    """Give ``model`` a full cache for the calls inside the block, and compact it to ``budget`` when the block ends.

    Args:
        model: a causal LM (GPT-2, Llama family), with or without Meta-KV.
        method: a registered method name or a method instance.
        budget: fraction in (0, 1] of the context's full-precision size kept.
        reference_queries: query vectors kept per KV head for methods that need them.
        **method_options: constructor arguments when ``method`` is a name.

    Yields:
        The :class:`CompactedCache` the block's forward calls read into; compacted on exit.

    Raises:
        ValueError: a budget outside (0, 1], an unknown method or bad method options.
    """
    budget = validate_budget(budget)
    cache = CompactedCache(method, None, model=model, reference_queries=reference_queries, **method_options)
    name = cache_argument_name(model.forward)
    signature = inspect.signature(model.forward)

    repeat = cache.method.reference == "repeat"
    read: list[torch.Tensor] = []  # the context's token ids, for a repeat-prefill

    def pass_the_cache(module, args, kwargs):
        if passed_cache(signature, args, kwargs) is None:
            kwargs = {**kwargs, name: cache, "use_cache": True}
            if repeat and not cache.is_probing:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None:
                    raise ValueError("reference='repeat' re-reads the context, so the calls must pass input_ids")
                read.append(ids)
        return args, kwargs

    # Prepended, so that hooks which read the cache (Meta-KV's meta-state) see this one.
    handle = model.register_forward_pre_hook(pass_the_cache, with_kwargs=True, prepend=True)
    try:
        yield cache
    finally:
        handle.remove()
    if repeat and read:
        repeat_prefill(model, cache, torch.cat(read, dim=1))
    cache.compact(budget)
