"""Compacted KV caches for long inputs.

The pieces:

* :mod:`metakv_cl.kv.protocol`: the compaction protocol
  ``compact(keys, values, queries, budget) -> (keys, values, bias)`` and shared helpers;
* :mod:`metakv_cl.kv.methods`: the methods (Attention Matching, attention-guided mixed
  precision, H2O, SnapKV, PyramidKV, TOVA, StreamingLLM sinks, sliding window, random, KIVI
  int8/int4, moving and cumulative averages, compressive memory, full), selectable by name
  with :func:`get_method`;
* :mod:`metakv_cl.kv.cache`: :class:`CompactedCache`, a transformers ``Cache`` that compacts
  itself under a byte budget;
* :mod:`metakv_cl.kv.attention`: the attention functions that add the per-entry bias and
  capture reference queries (:func:`enable_compacted_attention`);
* :mod:`metakv_cl.kv.streaming`: chunked prefill past the position limit, streaming
  likelihood and ``generate`` from a compacted cache;
* :mod:`metakv_cl.kv.oneshot`: one-shot compaction, ``with compaction(model, method, budget):``;
* :mod:`metakv_cl.kv.ruler`: RULER-style synthetic tasks (needles, variable tracking, common
  words) and their scoring;
* :mod:`metakv_cl.kv.evaluate`: the ``kv-eval`` (perplexity vs cache size), ``niah`` (needle in
  a haystack) and ``ruler`` (task accuracy) commands; their options: :mod:`metakv_cl.kv.arguments`.
"""

import importlib

# Public name -> submodule, loaded on first use: `metakv-cl kv-eval --help`, `niah --help` and `ruler --help`
# (metakv_cl.kv.arguments) need none of them, and the cache and attention code load transformers.
_EXPORTS = {
    "disable_compacted_attention": "attention",
    "enable_compacted_attention": "attention",
    "CompactedCache": "cache",
    "attach_compacted_cache": "cache",
    "CompactedLayer": "cache",
    "MASKED_BIAS": "protocol",
    "AttentionReceived": "protocol",
    "CompactedKV": "protocol",
    "KVCompressor": "protocol",
    "TokenSelector": "protocol",
    "KVStorage": "quantization",
    "QuantizedTensor": "quantization",
    "quantize": "quantization",
    "available_methods": "registry",
    "get_method": "registry",
    "register_method": "registry",
    "compaction": "oneshot",
    "chunked_prefill": "streaming",
    "continuation_log_likelihood": "streaming",
    "generate": "streaming",
    "repeat_prefill": "streaming",
    "stream_log_likelihood": "streaming",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"metakv_cl.kv.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'metakv_cl.kv' has no attribute {name!r}")
