"""The built-in compaction methods, one per module; importing this package registers them all."""

from metakv_cl.kv.methods.attention_matching import AttentionMatching
from metakv_cl.kv.methods.compressive_memory import CompressiveMemory
from metakv_cl.kv.methods.cumulative_average import CumulativeAverageSummary
from metakv_cl.kv.methods.dynamic_precision import AttentionGuidedPrecision
from metakv_cl.kv.methods.dynamic_precision_am import PrecisionWithMatchedEvictions
from metakv_cl.kv.methods.full import FullCache
from metakv_cl.kv.methods.h2o import H2O
from metakv_cl.kv.methods.kivi import KIVIQuantization
from metakv_cl.kv.methods.moving_average import MovingAverageSummary
from metakv_cl.kv.methods.pyramidkv import PyramidKV
from metakv_cl.kv.methods.random_eviction import RandomEviction
from metakv_cl.kv.methods.sliding_window import SlidingWindow
from metakv_cl.kv.methods.snapkv import SnapKV
from metakv_cl.kv.methods.streaming_llm import SinksWindow
from metakv_cl.kv.methods.tova import TOVA

__all__ = [
    "AttentionGuidedPrecision",
    "AttentionMatching",
    "CompressiveMemory",
    "CumulativeAverageSummary",
    "FullCache",
    "H2O",
    "KIVIQuantization",
    "MovingAverageSummary",
    "PrecisionWithMatchedEvictions",
    "PyramidKV",
    "RandomEviction",
    "SinksWindow",
    "SlidingWindow",
    "SnapKV",
    "TOVA",
]
