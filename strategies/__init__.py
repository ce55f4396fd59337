"""Continual-learning strategies: one Avalanche template whose training runs on Lightning, and
methods as plugins of it.

Installed as ``metakv_cl.strategies``. :class:`ContinualStrategy` takes ``plugins=[...]``
(method plugins from :mod:`metakv_cl.strategies.plugins` and Avalanche's own); call
``strategy.train(experience)`` and ``strategy.eval(stream)``. The named methods (:data:`STRATEGIES`:
the short names used by configs and reports) are presets that build fixed plugin lists
(:mod:`metakv_cl.strategies.presets`); :class:`JointTraining` is its own template, as in Avalanche.
"""

from metakv_cl.strategies.base import ContinualStrategy
from metakv_cl.strategies.joint import JointTraining
from metakv_cl.strategies.presets import (
    EWC,
    KNNLM,
    LoRA,
    LwF,
    MetaKVAddressed,
    MetaKVConsolidation,
    Naive,
    OLoRA,
    Replay,
    RetrievedExamples,
)

STRATEGIES: dict[str, type[ContinualStrategy]] = {
    cls.strategy_name: cls
    for cls in (Naive, EWC, LoRA, OLoRA, Replay, LwF, JointTraining, MetaKVConsolidation, MetaKVAddressed, KNNLM,
                RetrievedExamples)
}


def strategy_class(name: str) -> type[ContinualStrategy]:
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
    "ContinualStrategy",
    "JointTraining",
    "KNNLM",
    "LoRA",
    "LwF",
    "MetaKVAddressed",
    "MetaKVConsolidation",
    "Naive",
    "OLoRA",
    "Replay",
    "RetrievedExamples",
    "STRATEGIES",
    "strategy_class",
]
