"""Method plugins of :class:`~metakv_cl.strategies.base.ContinualStrategy`, one file per method.

They compose by list, as Avalanche's plugins do, and mix with Avalanche's own::

    ContinualStrategy(module=module, plugins=[Replay(buffer_size=64), EWC(mode="online")])
"""

from metakv_cl.strategies.plugins.bank_schedule import BankSchedule
from metakv_cl.strategies.plugins.base import MethodPlugin, PhaseFit, PluginConflictError, UnsupportedPluginError
from metakv_cl.strategies.plugins.ewc import EWC
from metakv_cl.strategies.plugins.knn_lm import KNNLM
from metakv_cl.strategies.plugins.lora import LoRA
from metakv_cl.strategies.plugins.lwf import LwF
from metakv_cl.strategies.plugins.metakv_consolidation import MetaKVConsolidation
from metakv_cl.strategies.plugins.olora import OLoRA
from metakv_cl.strategies.plugins.replay import Replay, ReplayMemory
from metakv_cl.strategies.plugins.retrieved_examples import RetrievedExamples
from metakv_cl.strategies.plugins.validated import Validated

__all__ = [
    "BankSchedule",
    "EWC",
    "KNNLM",
    "LoRA",
    "LwF",
    "MetaKVConsolidation",
    "MethodPlugin",
    "OLoRA",
    "PhaseFit",
    "PluginConflictError",
    "Replay",
    "ReplayMemory",
    "RetrievedExamples",
    "UnsupportedPluginError",
    "Validated",
]
