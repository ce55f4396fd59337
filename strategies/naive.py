"""Naive fine-tuning: train every parameter on each experience in turn (the lower reference)."""

from __future__ import annotations

from metakv_cl.strategies.base import LightningCLStrategy


class Naive(LightningCLStrategy):
    """Sequential fine-tuning of the whole model with the plain language-modelling loss.

    Takes the arguments of :class:`~metakv_cl.strategies.base.LightningCLStrategy`.
    """

    strategy_name = "naive"
