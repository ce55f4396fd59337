"""Lightning callbacks the strategies put on every Trainer they build."""

from __future__ import annotations

import math
import random
import time
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

if TYPE_CHECKING:
    from metakv_cl.strategies.base import ContinualStrategy


class AvalancheBridge(pl.Callback):
    """Calls the Avalanche plugin hooks of a strategy from inside Lightning's loops.

    Lightning runs the loops; Avalanche plugins expect the SGD template's events. The mapping:

    ============================  ==========================================================
    Lightning hook                Avalanche events (in order)
    ============================  ==========================================================
    ``on_train_epoch_start``      ``before_training_epoch``
    ``on_train_batch_start``      ``before_training_iteration``, ``before_forward``
    ``training_step``             ``after_forward``, ``before_backward`` (the module's
                                  ``loss_hook``: the step trains ``strategy.loss`` as the
                                  plugins left it)
    ``on_after_backward``         ``after_backward``
    ``on_before_optimizer_step``  ``before_update``
    ``on_train_batch_end``        ``after_update`` (when a step was taken), ``after_training_iteration``
    ``on_train_epoch_end``        ``after_training_epoch``
    ``on_validation_batch_*``     ``before_eval_iteration``, ``before_eval_forward`` /
                                  ``after_eval_forward``, ``after_eval_iteration``
    ============================  ==========================================================

    ``before/after_training_exp`` and ``before/after_eval_exp`` are fired by the template
    itself around each ``Trainer.fit`` / ``Trainer.validate``. The strategy's ``mbatch``,
    ``mb_output`` (logits) and ``loss`` (in evaluation: the batch's mean NLL) are set before the
    events that read them; ``optimizer`` and ``device`` are the running fit's. A plugin calling
    ``strategy.stop_training()`` stops the fit at once: after the current batch, or before the
    epoch's first batch when called at ``before_training_epoch``.

    Args:
        strategy: the Avalanche strategy whose plugins are called.
    """

    def __init__(self, strategy: "ContinualStrategy"):
        self.strategy = strategy
        self._stepped = False

    def _fire(self, trainer: pl.Trainer, *events: str) -> None:
        for event in events:
            self.strategy.trigger(event)
        if self.strategy.stop_requested:
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy.device = trainer.strategy.root_device
        self.strategy.bind_optimizer(trainer.optimizers[0])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.strategy.dataloader = trainer.train_dataloader  # Avalanche loggers size their bars by it
        self._fire(trainer, "before_training_epoch")

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self.strategy.mbatch = batch
        self._stepped = False
        self._fire(trainer, "before_training_iteration", "before_forward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._fire(trainer, "after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._stepped = True
        self._fire(trainer, "before_update")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._fire(trainer, "after_update")
        self._fire(trainer, "after_training_iteration")
        # drop the step's logits and graph (they can be large) once the plugins have seen them
        self.strategy.mb_output = self.strategy.loss = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._fire(trainer, "after_training_epoch")

    # Validation inside a fit selects the model on held-out training items; only the strategy's
    # own evaluation (Trainer.validate) is an Avalanche evaluation.

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return
        loaders = trainer.val_dataloaders
        self.strategy.dataloader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        self.strategy.device = trainer.strategy.root_device

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return
        self.strategy.mbatch = batch
        self._fire(trainer, "before_eval_iteration", "before_eval_forward")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return
        self.strategy.loss = outputs  # the module's validation_step returns the batch's loss
        self._fire(trainer, "after_eval_forward", "after_eval_iteration")
        self.strategy.loss = None


class ContinuingLogSteps(pl.Callback):
    """Logged steps that run on from one fit to the next, so one logger draws a stream as one curve.

    A strategy runs a Trainer per phase and experience, and each Trainer counts its steps from 0:
    in the shared logger every fit's curves would lie on top of the previous ones. Lightning logs
    at the fit loop's count of optimiser-stepping batches (its only use), so a fresh fit starts that
    count where the previous fit ended; a fit resumed from its checkpoint already holds the count it
    saved. One instance serves all the fits of a strategy; :meth:`state_dict` carries the count
    across a restart.
    """

    def __init__(self):
        self.logged_steps = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        if loop._batches_that_stepped == 0:
            loop._batches_that_stepped = self.logged_steps

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logged_steps = trainer.fit_loop.epoch_loop._batches_that_stepped

    def state_dict(self) -> dict[str, int]:
        return {"logged_steps": self.logged_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.logged_steps = int(state["logged_steps"])


class TrainingThroughput(pl.Callback):
    """Training tokens and training seconds of every fit it is put on, summed over the fits.

    The clock runs while training batches run: it starts at a batch's start when stopped, and
    stops at the epoch's last batch, before any validation inside the fit (also mid-epoch), and
    at the end of an epoch or fit. The device is synchronised only there, so steps still queue
    up on it; validation, checkpointing and the Trainer's set-up fall outside. Tokens are the
    batches' non-padding positions (``attention_mask``), counted on the device. Under DDP the
    tokens are summed over ranks and a fit lasts as long as its slowest rank, so
    :attr:`tokens_per_second` is the whole job's rate: N devices at full efficiency reach N times
    one device's.

    One instance serves all the fits of a strategy; :meth:`state_dict` carries the totals across
    a resumed stream, and, in a fit's checkpoints, the fit's own counts up to the checkpointed
    epoch: a fit resumed from ``last.ckpt`` adds to them only the epochs it runs again, so a
    killed and resumed run counts what an uninterrupted one counts.

    Not Lightning's ``ThroughputMonitor``: it synchronises the device after every batch (this
    callback only at the clock's stops), its ``length_fn`` returns a Python number per batch
    (counting a batch's non-padding tokens then waits for the device at every step too), and it
    keeps no state across fits or in a checkpoint, so a resumed run would not count what an
    uninterrupted one counts.
    """

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self._fit_tokens: torch.Tensor | int = 0  # this process's, since the fit (re)started
        self._fit_seconds = 0.0
        self._running_since: float | None = None
        # all ranks' counts of the current fit at its last epoch end, and those a resumed fit
        # inherits from its checkpoint
        self._epoch_end_tokens, self._epoch_end_seconds = 0, 0.0
        self._restored_tokens, self._restored_seconds = 0, 0.0

    @property
    def tokens_per_second(self) -> float | None:
        """All ranks' training tokens per second, or None before any training."""
        return self.tokens / self.seconds if self.seconds > 0 else None

    @staticmethod
    def _now(trainer: pl.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def _stop_clock(self, trainer: pl.Trainer) -> None:
        if self._running_since is not None:
            self._fit_seconds += self._now(trainer) - self._running_since
            self._running_since = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before Lightning restores a checkpoint into this callback (on_train_start comes after)
        if stage == "fit":
            self._fit_tokens, self._fit_seconds, self._running_since = 0, 0.0, None
            self._epoch_end_tokens, self._epoch_end_seconds = 0, 0.0
            self._restored_tokens, self._restored_seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._running_since is None:
            self._running_since = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        mask = batch.get("attention_mask")
        self._fit_tokens = self._fit_tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.should_stop:
            self._stop_clock(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._stop_clock(trainer)

    def _fit_counts(self, trainer: pl.Trainer) -> tuple[int, float]:
        """All ranks' tokens and seconds of the current fit, a restored part included."""

        def over_ranks(value: torch.Tensor | float, reduce_op: str) -> float:
            local = torch.as_tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
            return float(trainer.strategy.reduce(local, reduce_op=reduce_op))

        tokens = int(over_ranks(self._fit_tokens, "sum")) + self._restored_tokens
        # the fit lasts as long as its slowest rank
        return tokens, over_ranks(self._fit_seconds, "max") + self._restored_seconds

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clock(trainer)
        # before ModelCheckpoint (Lightning runs checkpoint callbacks last) saves this epoch
        self._epoch_end_tokens, self._epoch_end_seconds = self._fit_counts(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clock(trainer)
        tokens, seconds = self._fit_counts(trainer)
        self.tokens += tokens
        self.seconds += seconds
        self._epoch_end_tokens, self._epoch_end_seconds = 0, 0.0  # counted in the totals now

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "fit_tokens": self._epoch_end_tokens,
            "fit_seconds": self._epoch_end_seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens, self.seconds = int(state_dict["tokens"]), float(state_dict["seconds"])
        self._restored_tokens = int(state_dict.get("fit_tokens", 0))
        self._restored_seconds = float(state_dict.get("fit_seconds", 0.0))


class BestWeights(pl.Callback):
    """Restore, at the end of a fit, the weights of the epoch with the best validation score.

    Only the parameters named in ``names`` are kept (the ones the fit trains: a copy of them is
    small), in memory and in the fit's checkpoints, so a resumed fit still ends on its best epoch.
    Use with ``EarlyStopping`` on the same monitor: that decides when to stop, this what to keep.

    Args:
        monitor: the logged validation metric.
        names: names of the trained parameters in ``pl_module.model``.
        mode: ``"min"`` or ``"max"``.
    """

    def __init__(self, monitor: str, names: list[str], mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.names, self.mode = monitor, list(names), mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"BestWeights monitors {self.monitor!r}, which the validation did not log")
        score = float(trainer.callback_metrics[self.monitor])
        if not math.isfinite(score):
            raise FloatingPointError(f"validation {self.monitor} is {score} at epoch {trainer.current_epoch}")
        better = self.best_score is None or (score < self.best_score if self.mode == "min" else score > self.best_score)
        if better:
            parameters = dict(pl_module.model.named_parameters())
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self.best_weights = {name: parameters[name].detach().clone() for name in self.names}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_weights is None:
            return
        parameters = dict(pl_module.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                parameters[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        weights = None if self.best_weights is None else {n: w.cpu() for n, w in self.best_weights.items()}
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_weights": weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state_dict["best_score"], state_dict["best_epoch"]
        self.best_weights = state_dict["best_weights"]


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed determined by ``parts`` (stable across processes and Python runs)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators, and nothing else.

    What ``pl.seed_everything`` seeds, without its environment variables: this reseeds at
    derived points (every batch, around each fit), while Lightning reads ``PL_GLOBAL_SEED`` as
    the run's seed (DDP re-seeds each process from it at set-up, distributed samplers shuffle
    by it), so it must keep the seed the run started with (the CLI's ``seed_everything``).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class BatchSeeding(pl.Callback):
    """Reseed the global generators before every training batch from (seed, key, epoch, batch).

    Everything random in a step (dropout, ...) then depends only on where the step is, so a fit
    resumed from a checkpoint reproduces the uninterrupted run exactly (whatever Lightning does
    or skips while restarting), and DDP ranks draw the same numbers.

    Args:
        seed: the run's seed.
        key: what identifies this fit, e.g. ``("exp_002", "train")``.
    """

    def __init__(self, seed: int, key: tuple):
        self.seed, self.key = seed, key

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed_all(derived_seed(self.seed, *self.key, trainer.current_epoch, batch_idx))
