"""The validated schedule: model selection on held-out items of the method's own training data.

Before each selected fit a seeded share of its items is held out; the loss on them is validated
after every epoch, the fit stops once it has not improved for ``patience`` epochs (Lightning's
``EarlyStopping``) and ends on its best epoch (:class:`~metakv_cl.training.callbacks.BestWeights`,
restoring the parameters the fit trains). The number of epochs (up to the fit's ``max_epochs``)
is then chosen per experience from training data only, never from the test stream.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pytorch_lightning.callbacks import EarlyStopping

from metakv_cl.strategies.plugins.base import MethodPlugin, PhaseFit
from metakv_cl.training.callbacks import BestWeights, derived_seed

VALIDATION_METRIC = "eval/loss"  # logged by ContinualLMModule's validation


class Validated(MethodPlugin):
    """Early stopping and best-epoch restore on held-out training items.

    Args:
        validation_fraction: share of each selected fit's items held out, in (0, 1).
        patience: epochs without improvement before the fit stops.
        phases: the fits it applies to: ``"train"`` (the one fit of most methods) and
            ``"consolidate"`` (Meta-KV consolidation; its fast phase is never validated).

    Raises:
        ValueError: a fraction outside (0, 1), a negative patience or no phase.
    """

    exclusive = ("validated schedule",)

    def __init__(self, validation_fraction: float = 0.25, patience: int = 1, phases: Sequence[str] = ("train", "consolidate")):
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        if not phases:
            raise ValueError("phases: give at least one phase to validate (e.g. ['train'])")
        super().__init__()
        self.validation_fraction, self.patience, self.phases = validation_fraction, patience, tuple(phases)
        self._best: BestWeights | None = None

    def configure_fit(self, strategy, fit: PhaseFit) -> None:
        if fit.phase not in self.phases:
            return
        seed = derived_seed(strategy.seed, strategy.stage, "held-out")
        fit.dataset, fit.validation = held_out_split(fit.dataset, self.validation_fraction, seed)
        trained = [name for name, p in strategy.module.model.named_parameters() if p.requires_grad]
        self._best = BestWeights(VALIDATION_METRIC, trained)
        fit.callbacks += [EarlyStopping(VALIDATION_METRIC, patience=self.patience, mode="min"), self._best]

    def finish_fit(self, strategy, fit: PhaseFit) -> None:
        if fit.phase in self.phases and self._best is not None:
            fit.epochs_used = self._best.best_epoch + 1
            self._best = None


def held_out_split(dataset, fraction: float, seed: int):
    """Split an Avalanche dataset into (training items, held-out items), a seeded random share held out.

    Raises:
        ValueError: if either part would be empty.
    """
    size = len(dataset)
    held = max(1, round(fraction * size))
    if size - held < 1:
        raise ValueError(f"cannot hold out {fraction:.0%} of {size} item(s) and still train on some")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.subset(sorted(order[held:])), dataset.subset(sorted(order[:held]))
