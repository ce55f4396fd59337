"""Continual-learning strategies: Avalanche templates whose training runs on Lightning.

Installed as ``metakv_cl.strategies``. Every strategy is a
:class:`~metakv_cl.strategies.base.LightningCLStrategy` (call ``strategy.train(experience)`` and
``strategy.eval(stream)``); :data:`STRATEGIES` maps the short names used by configs and reports
to the classes.
"""

from metakv_cl.strategies.base import LightningCLStrategy
from metakv_cl.strategies.ewc import EWC
from metakv_cl.strategies.joint import JointTraining
from metakv_cl.strategies.lora import LoRA
from metakv_cl.strategies.lwf import LwF
from metakv_cl.strategies.metakv import MetaKVConsolidation
from metakv_cl.strategies.naive import Naive
from metakv_cl.strategies.replay import Replay, ReplayMemory

STRATEGIES: dict[str, type[LightningCLStrategy]] = {
    cls.strategy_name: cls for cls in (Naive, EWC, LoRA, Replay, LwF, JointTraining, MetaKVConsolidation)
}


def strategy_class(name: str) -> type[LightningCLStrategy]:
    """The strategy class registered as ``name`` (e.g. ``"ewc"``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known strategies: {', '.join(sorted(STRATEGIES))}") from None


__all__ = [
    "EWC",
    "JointTraining",
    "LightningCLStrategy",
    "LoRA",
    "LwF",
    "MetaKVConsolidation",
    "Naive",
    "Replay",
    "ReplayMemory",
    "STRATEGIES",
    "strategy_class",
]
