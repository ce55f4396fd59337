"""The training engine: the LightningModule, data loading, callbacks and the stream runner."""

from metakv_cl.training.module import ContinualLMModule, NonFiniteLossError
from metakv_cl.training.resident import RESIDENT_STRATEGY_NAME, ResidentSingleDeviceStrategy
from metakv_cl.training.runner import StreamState, compare, finish_report, run_stream, warm_up

__all__ = [
    "RESIDENT_STRATEGY_NAME",
    "ContinualLMModule",
    "NonFiniteLossError",
    "ResidentSingleDeviceStrategy",
    "StreamState",
    "compare",
    "finish_report",
    "run_stream",
    "warm_up",
]
