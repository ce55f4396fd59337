"""Compacted KV caches for long inputs.

The pieces:

* :mod:`metakv_cl.kv.protocol`: the compaction protocol
  ``compact(keys, values, queries, budget) -> (keys, values, bias)`` and shared helpers;
* :mod:`metakv_cl.kv.methods`: the methods (Attention Matching, attention-guided mixed
  precision, H2O, StreamingLLM sinks, sliding window, random, KIVI int8/int4, moving and
  cumulative averages, compressive memory, full), selectable by name with :func:`get_method`;
* :mod:`metakv_cl.kv.cache`: :class:`CompactedCache`, a transformers ``Cache`` that compacts
  itself under a byte budget;
* :mod:`metakv_cl.kv.attention`: the attention functions that add the per-entry bias and
  capture reference queries (:func:`enable_compacted_attention`);
* :mod:`metakv_cl.kv.streaming`: chunked prefill past the position limit, streaming
  likelihood and ``generate`` from a compacted cache;
* :mod:`metakv_cl.kv.evaluate`: the ``kv-eval`` (perplexity vs cache size) and ``niah``
  (needle in a haystack) commands.
"""

from metakv_cl.kv.attention import disable_compacted_attention, enable_compacted_attention
from metakv_cl.kv.cache import CompactedCache, CompactedLayer
from metakv_cl.kv.protocol import MASKED_BIAS, AttentionReceived, CompactedKV, KVCompressor, TokenSelector
from metakv_cl.kv.quantization import KVStorage, QuantizedTensor, quantize
from metakv_cl.kv.registry import available_methods, get_method, register_method
from metakv_cl.kv.streaming import chunked_prefill, generate, stream_log_likelihood

__all__ = [
    "MASKED_BIAS",
    "AttentionReceived",
    "CompactedCache",
    "CompactedKV",
    "CompactedLayer",
    "KVCompressor",
    "KVStorage",
    "QuantizedTensor",
    "TokenSelector",
    "available_methods",
    "chunked_prefill",
    "disable_compacted_attention",
    "enable_compacted_attention",
    "generate",
    "get_method",
    "quantize",
    "register_method",
    "stream_log_likelihood",
]
