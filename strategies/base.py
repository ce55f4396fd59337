"""The continual-learning strategy: Avalanche's template, Lightning's loops, methods as plugins.

Users drive it the Avalanche way::

    strategy = ContinualStrategy(
        module=ContinualLMModule("gpt2", from_scratch=True, ...),
        plugins=[Replay(buffer_size=64), EWC(mode="online")],
        trainer_kwargs=dict(max_epochs=2, accelerator="cpu"),
    )
    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)   # fills strategy.eval_scores

A method is a list of plugins (:mod:`metakv_cl.strategies.plugins`); the named methods of
configs and reports (``naive``, ``ewc``, ``replay``, ...) are presets that build such lists
(:mod:`metakv_cl.strategies.presets`). Every ``strategy.train(experience)`` is one or more
Lightning ``Trainer.fit`` (one per *phase*: most methods have one phase, ``"train"``; Meta-KV
consolidation has ``"fast"`` and ``"consolidate"``), so DDP, precision, gradient accumulation,
loggers and progress bars come from the ``trainer_kwargs``; each phase checkpoints ``last.ckpt``
at every epoch end under ``<root_dir>/experiences/<stage>/<phase>/``.

Why a ``Trainer`` per fit rather than one per stream: a Lightning ``Trainer`` keeps its fit loop's
progress (epochs, steps, a finished ``max_epochs``), its callback list and its checkpoint folder
from one ``fit`` to the next, while each phase here needs its own epochs, its own callbacks (the
validated schedule's early stopping and best-weights restore) and its own ``last.ckpt`` to resume
from; one Trainer would carry early-stopping counters and the epoch count from one experience
into the next. The cost is a Trainer set-up per fit (outside the training steps; see
``benchmarks/engine_throughput.py``). All fits share one logger (:meth:`logger`), whose steps run
on from fit to fit (:class:`~metakv_cl.training.callbacks.ContinuingLogSteps`).

Avalanche's contract: at each event the strategy holds what Avalanche's SGD templates hold
(``model``, ``optimizer``, ``device``, ``experience``, ``adapted_dataset``, ``dataloader``,
``mbatch``, ``mb_x`` / ``mb_y`` / ``mb_task_id``, ``mb_output``, ``loss``, ``_criterion``,
``clock``, ``is_training``); the template fires the experience events, and
:class:`~metakv_cl.training.callbacks.AvalancheBridge` the epoch and iteration events from inside
Lightning. The training step uses what plugins change: ``strategy.loss`` after
``before_backward`` (a penalty added there is trained), a ``strategy.dataloader`` replaced in
``before_training_exp`` (Avalanche's ``ReplayPlugin``) and ``stop_training()``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

import metakv_cl  # noqa: F401  (torchvision import fix before avalanche loads)
import pytorch_lightning as pl
from avalanche.core import BasePlugin, BaseSGDPlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.clock import Clock
from avalanche.training.templates.base import BaseTemplate
from avalanche.training.utils import trigger_plugins
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from metakv_cl.metrics import ContinualMatrixPluginMetric
from metakv_cl.runfolder import (
    DamagedCheckpointError,
    check_folder_name,
    load_checkpoint,
    safe_checkpoint_loading,
)
from metakv_cl.data.collate import positional
from metakv_cl.data.scoring import sequence_nll
from metakv_cl.strategies.plugins.base import MethodPlugin, PhaseFit, check_conflicts, check_supported
from metakv_cl.training.bucketing import check_token_budget
from metakv_cl.training.callbacks import (
    AvalancheBridge,
    BatchSeeding,
    ContinuingLogSteps,
    TrainingThroughput,
    derived_seed,
    seed_all,
)
from metakv_cl.training.datamodule import (
    EvaluationDataModule,
    GivenTrainingLoader,
    TrainingDataModule,
    ValidatedTrainingDataModule,
)
from metakv_cl.training.module import ContinualLMModule
from metakv_cl.training.packing import check_pack_length
from metakv_cl.training.passes import compute_device

_log = logging.getLogger(__name__)

# Lightning's informational messages (device summary, "fit stopped", tips) go through this
# logger; a stream builds one Trainer per phase, so they are silenced unless verbose.
_LIGHTNING_INFO_LOGGER = "pytorch_lightning.utilities.rank_zero"


@contextlib.contextmanager
def quiet_lightning(enabled: bool = True):
    """Hide Lightning's INFO messages inside the block (warnings still show)."""
    logger = logging.getLogger(_LIGHTNING_INFO_LOGGER)
    previous = logger.level
    if enabled:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


# Trainer arguments the strategy sets itself for every fit.
_MANAGED_TRAINER_KEYS = ("default_root_dir", "callbacks", "logger", "enable_checkpointing")


def lm_criterion(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Avalanche's ``strategy._criterion`` for a causal LM: mean next-token NLL over the label tokens.

    Args:
        output: the model's output (with ``logits``) or the logits ``[batch, length, vocab]``.
        labels: ``[batch, length]`` token ids, ``-100`` where no loss is taken.
    """
    logits = getattr(output, "logits", output)
    nll, count = sequence_nll(logits, labels)
    return nll.sum() / count.sum().clamp_min(1)


class ContinualStrategy(BaseTemplate):
    """The continual-learning strategy: Avalanche's template, Lightning's loops, methods as plugins.

    Args:
        module: the :class:`ContinualLMModule` to train (also ``strategy.model``).
        train_mb_size: training mini-batch size per process.
        train_pack_length: pack the documents of each language-modelling training mini-batch into
            rows of this many tokens (:mod:`metakv_cl.training.packing`): the same documents per
            step, so the same losses and gradients, without the padding. At least the longest
            training item; None (the default): padded batches. Classification experiences keep
            padded batches.
        train_token_budget: make each training mini-batch of padded items (classification
            experiences, and language-modelling ones when not packed) a group of items of
            similar length, as many as fit ``items x longest item <= train_token_budget``
            (:mod:`metakv_cl.training.bucketing`); ``train_mb_size`` then does not apply to those
            batches. An item longer than the budget gets a batch of its own. None (the default):
            ``train_mb_size`` items per batch.
        eval_mb_size: evaluation mini-batch size per process.
        trainer_kwargs: ``pytorch_lightning.Trainer`` arguments used for every fit
            (``max_epochs`` = epochs per experience, default 1). ``default_root_dir`` is the
            run folder; ``callbacks`` and ``logger`` are shared by all fits;
            ``enable_checkpointing=False`` turns the per-epoch ``last.ckpt`` off.
        plugins: method plugins (:mod:`metakv_cl.strategies.plugins`) and Avalanche plugins, in
            the order their events fire; none: naive fine-tuning.
        evaluator: an Avalanche ``EvaluationPlugin``; default: one with
            :class:`~metakv_cl.metrics.ContinualMatrixPluginMetric` and no loggers.
        seed: seed of shuffling and of every batch's random numbers.
        num_workers: DataLoader workers.
        name: method name in reports and folder name of its logs and of its run in a comparison
            (default: the method plugins' names joined by ``+``, e.g. ``"replay+ewc-online"``, or
            ``"naive"``): letters, digits, ``.``, ``_``, ``+`` and ``-``.
        root_dir: run folder (overrides ``trainer_kwargs["default_root_dir"]``).
        verbose: show Lightning's informational messages for every fit (off: one Trainer per
            phase would repeat them).

    Raises:
        TypeError: ``module`` is not a ContinualLMModule.
        ValueError: a bad size, name or option; two plugins that hold the same resource
            (:class:`~metakv_cl.strategies.plugins.base.PluginConflictError`), or an Avalanche
            plugin that needs a classifier
            (:class:`~metakv_cl.strategies.plugins.base.UnsupportedPluginError`).
    """

    PLUGIN_CLASS = BaseSGDPlugin
    #: registry / report name of the strategy when no method plugin names it.
    strategy_name = "naive"
    #: whether the strategy trains Meta-KV attention whatever its plugins (see :meth:`trains_meta_kv`).
    uses_meta_kv = False

    def __init__(
        self,
        *,
        module: ContinualLMModule,
        train_mb_size: int = 8,
        train_pack_length: int | None = None,
        train_token_budget: int | None = None,
        eval_mb_size: int = 16,
        trainer_kwargs: dict[str, Any] | None = None,
        plugins: Sequence[BasePlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        seed: int = 0,
        num_workers: int = 0,
        name: str | None = None,
        root_dir: str | Path | None = None,
        verbose: bool = False,
    ):
        if not isinstance(module, ContinualLMModule):
            raise TypeError(f"module must be a ContinualLMModule, got {type(module).__name__}")
        if name is not None:
            check_folder_name(name, "strategy name")
        for key, value in (("train_mb_size", train_mb_size), ("eval_mb_size", eval_mb_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r} is not a mini-batch size; give an integer >= 1")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers: {num_workers!r} is not a worker count; give an integer >= 0")
        plugins = list(plugins or [])
        check_supported(plugins)
        check_conflicts(plugins)
        kwargs = dict(trainer_kwargs or {})
        super().__init__(model=module, device=compute_device(kwargs), plugins=plugins)
        self.root_dir = Path(root_dir or kwargs.get("default_root_dir") or "metakv_runs")
        callbacks = kwargs.get("callbacks") or []
        self.user_callbacks: list[pl.Callback] = list(callbacks) if isinstance(callbacks, Iterable) else [callbacks]
        self._user_logger = kwargs.get("logger", True)
        self.checkpointing = kwargs.get("enable_checkpointing", True) is not False
        self.trainer_kwargs = {k: v for k, v in kwargs.items() if k not in _MANAGED_TRAINER_KEYS}
        if self.trainer_kwargs.get("max_epochs") is None and self.trainer_kwargs.get("max_steps", -1) in (-1, None):
            self.trainer_kwargs["max_epochs"] = 1  # Lightning's own default would be 1000 per experience
        self.train_mb_size, self.eval_mb_size = train_mb_size, eval_mb_size
        check_pack_length(train_pack_length)
        self.train_pack_length = train_pack_length
        check_token_budget(train_token_budget)
        self.train_token_budget = train_token_budget
        self.seed, self.num_workers = seed, num_workers
        self._name = name
        self.verbose = verbose
        self.train_epochs = self.trainer_kwargs.get("max_epochs")
        self.eval_every = -1  # no evaluation inside an experience's fits (Avalanche's periodic eval)
        self.method_plugins: list[MethodPlugin] = [p for p in self.plugins if isinstance(p, MethodPlugin)]

        if evaluator is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="No loggers specified")
                self.matrix_metric: ContinualMatrixPluginMetric | None = ContinualMatrixPluginMetric(
                    higher_is_better=False
                )
                evaluator = EvaluationPlugin(self.matrix_metric, loggers=[])
        else:
            self.matrix_metric = None
        self.evaluator = evaluator
        self.plugins.append(evaluator)
        self.clock = Clock()
        self.plugins.append(self.clock)  # last, as Avalanche's templates do

        # training / evaluation state read by plugins and by the metric contract
        self.eval_scores: dict[int, float] = {}
        self.eval_results: dict[int, dict[str, float]] = {}
        self.eval_items: dict[int, dict[str, Any]] = {}  # per-item outcomes (ContinualLMModule.eval_items)
        self.trained_experiences = 0
        self.experience_names: list[str] | None = None
        self.adapted_dataset = None
        self.dataloader: Any = []
        self.mbatch: Any = None
        self.mb_output: Any = None
        self.loss: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None  # the running fit's (Lightning builds one per fit)
        self._criterion = lm_criterion
        self._default_loader: Any = None  # the training loader a plugin may replace
        self._plugin_loader: Any = None
        self.stage = "unstarted"
        self.experience_index: int | None = None
        self.resume_phases = False
        self._stop_training = False
        self._logger: Any = None
        self._eval_trainer: pl.Trainer | None = None
        self._eval_data: EvaluationDataModule | None = None
        self.trainable_counts: dict[str, int] = {}  # phase -> parameters it trained (latest experience)
        # parameters trained by any phase of the running experience, held (not only their ids) so
        # that an id freed between phases (a removed adapter) cannot be counted for a new tensor
        self._experience_trained: dict[int, torch.nn.Parameter] = {}
        self.trainable_params = 0  # the most parameters one experience trained, over all its phases
        self.throughput = TrainingThroughput()  # shared by every fit
        self.log_steps = ContinuingLogSteps()  # shared by every fit
        for plugin in self.method_plugins:
            plugin.attach(self)

    # ------------------------------------------------------------------ names and helpers

    @property
    def module(self) -> ContinualLMModule:
        return self.model

    @property
    def method_name(self) -> str:
        """The name of this method in reports."""
        return self._name or self.default_method_name()

    def default_method_name(self) -> str:
        """The method plugins' names joined by ``+``; :attr:`strategy_name` when none has one."""
        return "+".join(p.method_name for p in self.method_plugins if p.method_name) or self.strategy_name

    def plugin(self, cls: type) -> Any:
        """The plugin of type ``cls`` of this strategy.

        Raises:
            LookupError: the strategy has no such plugin.
        """
        found = [p for p in self.plugins if isinstance(p, cls)]
        if not found:
            names = ", ".join(type(p).__name__ for p in self.plugins)
            raise LookupError(f"{self.method_name} has no {cls.__name__} plugin; its plugins: {names}")
        return found[0]

    @classmethod
    def trains_meta_kv(cls, plugin_classes: Sequence[type] = ()) -> bool:
        """Whether this strategy, with plugins of ``plugin_classes``, trains Meta-KV attention
        (``compare`` runs the others on the plain model unless their entry sets ``model.meta_kv``)."""
        return cls.uses_meta_kv or any(getattr(p, "uses_meta_kv", False) for p in plugin_classes)

    # ------------------------------------------------------------------ Avalanche's mini-batch view

    @property
    def mb_x(self) -> torch.Tensor | None:
        """The mini-batch's token ids (:func:`~metakv_cl.data.collate.positional` 0)."""
        return None if self.mbatch is None else positional(self.mbatch, 0)

    @property
    def mb_y(self) -> torch.Tensor | None:
        """The mini-batch's targets: next-token ``labels``, or the gold choice of a classification test batch."""
        return None if self.mbatch is None else positional(self.mbatch, 1)

    @property
    def mb_task_id(self) -> torch.Tensor | None:
        """Task labels of the mini-batch: all 0 (the model is single-headed and gets no task identity)."""
        return None if self.mbatch is None else positional(self.mbatch, -1)

    @property
    def stop_requested(self) -> bool:
        return self._stop_training

    def stop_training(self) -> None:
        """Ask the running fit to stop after the current batch (what Avalanche plugins call)."""
        self._stop_training = True

    def trigger(self, event: str, **kwargs: Any) -> None:
        """Call ``event`` on every plugin."""
        trigger_plugins(self, event, **kwargs)

    def experience_label(self, index: int | None = None) -> str:
        index = self.experience_index if index is None else index
        if index is None:
            return self.stage
        if self.experience_names and 0 <= index < len(self.experience_names):
            return f"experience {index} ({self.experience_names[index]!r})"
        return f"experience {index}"

    def stage_for(self, index: int) -> str:
        """Name of the stage that trains experience ``index`` (its checkpoint folder)."""
        return f"exp_{index:03d}"

    def stage_dir(self) -> Path:
        """Folder of the current stage's per-phase checkpoints."""
        return self.root_dir / "experiences" / self.stage

    def logger(self):
        """The logger shared by all fits (a CSVLogger under the run folder unless configured)."""
        if self._logger is None:
            if self._user_logger is True or self._user_logger is None:
                self._logger = CSVLogger(str(self.root_dir), name="logs", version=self.method_name)
            else:
                self._logger = self._user_logger
        return self._logger

    # ------------------------------------------------------------------ training

    def _before_training_exp(self, **kwargs: Any) -> None:
        experience = self.experience
        self.experience_index = int(experience.current_experience)
        self.stage = self.stage_for(self.experience_index)
        self.module.experience_label = self.experience_label()
        self._stop_training = False
        seed_all(derived_seed(self.seed, self.stage, "before"))
        self.trigger("before_train_dataset_adaptation", **kwargs)
        self.train_dataset_adaptation()
        self.trigger("after_train_dataset_adaptation", **kwargs)
        if self.adapted_dataset is None or len(self.adapted_dataset) == 0:
            raise ValueError(f"{self.experience_label()}: the training dataset is empty (an experience needs data)")
        # what Avalanche's templates hold at before_training_exp: a plugin may replace it
        self.dataloader = self._default_loader = TrainingDataModule(
            self.adapted_dataset, batch_size=self.train_mb_size, seed=derived_seed(self.seed, self.stage, "train"),
            num_workers=self.num_workers, pack_length=self.train_pack_length, token_budget=self.train_token_budget,
        ).train_dataloader()
        super()._before_training_exp(**kwargs)
        self._plugin_loader = self.dataloader if self.dataloader is not self._default_loader else None

    def train_dataset_adaptation(self) -> None:
        """Set :attr:`adapted_dataset`: the experience's data as the method plugins adapt it
        (replay adds its buffer)."""
        dataset = self.experience.dataset
        for plugin in self.method_plugins:
            dataset = plugin.adapt_train_dataset(self, dataset)
        self.adapted_dataset = dataset

    def _train_exp(self, experience, eval_streams=None, **kwargs: Any) -> None:
        owner = next((p for p in self.method_plugins if p.owns_training), None)
        if owner is not None:
            owner.train_experience(self)
        else:
            self.fit_phase("train", self.adapted_dataset)

    def _after_training_exp(self, **kwargs: Any) -> None:
        # random draws after the fits (buffer sampling, ...) must not depend on whether the
        # fits ran here or were restored from checkpoints
        seed_all(derived_seed(self.seed, self.stage, "after"))
        self.trained_experiences += 1
        trained = sum(p.numel() for p in self._experience_trained.values())
        self.trainable_params = max(self.trainable_params, trained)
        self._experience_trained = {}
        super()._after_training_exp(**kwargs)

    def _train_cleanup(self) -> None:
        super()._train_cleanup()
        # keep the strategy light to pickle and free the data references
        self.adapted_dataset, self.mbatch, self.mb_output, self.loss = None, None, None, None
        self.dataloader, self._default_loader, self._plugin_loader = [], None, None

    def _eval_cleanup(self) -> None:
        super()._eval_cleanup()
        self.mbatch, self._eval_data, self.dataloader = None, None, []

    def step_loss(self, batch: dict, outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        """The training step's loss after Avalanche's ``after_forward`` and ``before_backward``
        (the module calls this inside its ``training_step``; a plugin may add to ``strategy.loss``)."""
        self.mbatch, self.mb_output, self.loss = batch, getattr(outputs, "logits", outputs), loss
        self.trigger("after_forward")
        self.trigger("before_backward")
        return self.loss

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer`` (the one Lightning built for the running fit) :attr:`optimizer`, and
        point Avalanche's ``LRSchedulerPlugin`` schedulers at it (they were built on the user's)."""
        from avalanche.training.plugins import LRSchedulerPlugin

        self.optimizer = optimizer
        for plugin in self.plugins:
            if isinstance(plugin, LRSchedulerPlugin) and plugin.scheduler.optimizer is not optimizer:
                for group in optimizer.param_groups:
                    group.setdefault("initial_lr", group["lr"])
                plugin.scheduler.optimizer = optimizer
                plugin.scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]

    def fit_phase(
        self,
        phase: str,
        dataset,
        *,
        max_epochs: int | None = None,
        callbacks: Sequence[pl.Callback] = (),
        batch_size: int | None = None,
    ) -> PhaseFit:
        """Run one ``Trainer.fit`` of the current stage, as the method plugins configure it.

        On a resumed stage the fit restarts from the phase's ``last.ckpt`` (a finished phase
        then only reloads its final weights). A fit on :attr:`adapted_dataset` reads its batches
        from a dataloader a plugin put in :attr:`dataloader` at ``before_training_exp``, if any.

        Args:
            phase: phase name (its checkpoint folder).
            dataset: items to train on.
            max_epochs: epochs of this phase (default: ``trainer_kwargs["max_epochs"]``).
            callbacks: extra callbacks for this fit.
            batch_size: mini-batch size (default :attr:`train_mb_size`).

        Returns:
            The finished fit (its ``trainer`` and ``epochs_used``).

        Raises:
            ValueError: nothing to train on.
        """
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{self.experience_label()}: nothing to train on in phase {phase!r} (empty dataset)")
        self._stop_training = False  # a stop_training() ends the fit it was called in, not the next phase
        fit = PhaseFit(phase, dataset, max_epochs=max_epochs, callbacks=list(callbacks))
        plugin_loader = self._plugin_loader if dataset is self.adapted_dataset else None
        for plugin in self.method_plugins:
            plugin.configure_fit(self, fit)
        if plugin_loader is not None and fit.validation is not None:
            raise ValueError(
                f"phase {phase!r}: a plugin replaced the training dataloader and another holds items out of the "
                "same data for validation; combine replay by dataloader with validation in separate strategies"
            )
        phase_dir = self.stage_dir() / phase
        all_callbacks = [
            *self.user_callbacks,
            AvalancheBridge(self),
            BatchSeeding(self.seed, (self.stage, phase)),
            self.throughput,
            self.log_steps,
            *fit.callbacks,
        ]
        if self.checkpointing:
            all_callbacks.append(
                # one file, "last.ckpt", rewritten at the end of every epoch
                ModelCheckpoint(
                    dirpath=phase_dir,
                    filename="last",
                    save_top_k=1,
                    every_n_epochs=1,
                    save_on_train_epoch_end=True,
                    enable_version_counter=False,
                )
            )
        kwargs = dict(self.trainer_kwargs)
        # the data modules give each DDP rank its own share (a token-budget batch sampler
        # included, which Lightning's sampler injection would otherwise try to rebuild)
        kwargs["use_distributed_sampler"] = False
        if fit.max_epochs is not None:
            kwargs["max_epochs"] = fit.max_epochs
        if fit.validation is not None:
            kwargs.update(check_val_every_n_epoch=1, num_sanity_val_steps=0, limit_val_batches=1.0)
        trained = [p for p in self.module.parameters() if p.requires_grad]
        self.trainable_counts[phase] = sum(p.numel() for p in trained)
        self._experience_trained.update((id(p), p) for p in trained)
        with quiet_lightning(not self.verbose):
            trainer = pl.Trainer(
                **kwargs,
                default_root_dir=str(phase_dir),
                callbacks=all_callbacks,
                logger=self.logger(),
                enable_checkpointing=self.checkpointing,
            )
        loading = dict(
            batch_size=batch_size or self.train_mb_size,
            seed=derived_seed(self.seed, self.stage, phase),
            num_workers=self.num_workers,
            pack_length=self.train_pack_length,
            token_budget=self.train_token_budget,
        )
        if plugin_loader is not None:
            datamodule = GivenTrainingLoader(plugin_loader)
        elif fit.validation is None:
            datamodule = TrainingDataModule(fit.dataset, **loading)
        else:
            datamodule = ValidatedTrainingDataModule(fit.dataset, fit.validation, **loading)
        ckpt_path = self._resumable_checkpoint(phase_dir / "last.ckpt", phase) if self.resume_phases else None
        self.module.train()  # Lightning keeps the mode it finds; models load in eval mode
        with quiet_lightning(not self.verbose), warnings.catch_warnings(), safe_checkpoint_loading():
            # training-only fits: the module's validation_step serves strategy.eval
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            # the phase folder holds this phase's own last.ckpt when resuming
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            self.module.loss_hook = self.step_loss
            try:
                trainer.fit(self.module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            finally:
                self.module.loss_hook = None
        fit.trainer, fit.epochs_used = trainer, trainer.current_epoch
        for plugin in self.method_plugins:
            plugin.finish_fit(self, fit)
        return fit

    def _resumable_checkpoint(self, path: Path, phase: str) -> str | None:
        """``path`` if it holds a checkpoint to resume ``phase`` from, else None.

        A truncated or corrupt file (a full disk, a kill while it was written) is skipped with a
        warning: the phase restarts from the weights it would have started from. One holding
        objects that loading would have to run is refused (:class:`UnsafeCheckpointError`), and
        one that cannot be read at all (permissions, I/O) raises: it may be whole, so it is kept.
        """
        if not path.is_file():
            return None
        try:
            load_checkpoint(path)
        except DamagedCheckpointError as error:
            _log.warning(f"{error}; restarting phase {phase!r} of {self.experience_label()} from its start")
            return None
        return str(path)

    # ------------------------------------------------------------------ evaluation

    def _before_eval(self, **kwargs: Any) -> None:
        experiences = list(self.current_eval_stream)
        if self.matrix_metric is not None and experiences:
            # the metric's orientation follows the stream: accuracy up, loss down
            first = experiences[0].dataset[0]
            self.matrix_metric.higher_is_better = "choice_input_ids" in first
        super()._before_eval(**kwargs)

    def _before_eval_exp(self, **kwargs: Any) -> None:
        self.trigger("before_eval_dataset_adaptation", **kwargs)
        dataset = self.experience.dataset
        self.trigger("after_eval_dataset_adaptation", **kwargs)
        if len(dataset) == 0:
            raise ValueError(f"{self.experience_label(self.experience.current_experience)}: the test set is empty")
        self._eval_data = EvaluationDataModule(dataset, batch_size=self.eval_mb_size, num_workers=self.num_workers)
        self.dataloader = self._eval_data.val_dataloader()  # what Avalanche loggers size their bars by
        super()._before_eval_exp(**kwargs)

    def _eval_exp(self, **kwargs: Any) -> None:
        datamodule = self._eval_data
        with quiet_lightning(not self.verbose):
            self.evaluation_trainer().validate(self.module, datamodule=datamodule, verbose=False)
        result = dict(self.module.eval_result)
        index = int(self.experience.current_experience)
        self.eval_results[index] = result
        self.eval_items[index] = self.module.eval_items
        self.eval_scores[index] = result["accuracy"] if "accuracy" in result else result["loss"]

    def evaluation_trainer(self) -> pl.Trainer:
        """The Trainer used for every ``validate`` (built once)."""
        if self._eval_trainer is None:
            kwargs = dict(self.trainer_kwargs)
            kwargs.setdefault("enable_model_summary", False)
            with quiet_lightning(not self.verbose):
                self._eval_trainer = pl.Trainer(
                    **kwargs,
                    default_root_dir=str(self.root_dir),
                    callbacks=[AvalancheBridge(self)],
                    logger=False,
                    enable_checkpointing=False,
                )
        return self._eval_trainer

    def report_extra(self) -> dict[str, Any]:
        """Facts about the run for the report's ``extra`` (updated after every experience).

        ``trainable_params`` is the most parameters one experience trained, each parameter trained
        in any of its phases counted once (the fast LoRA and the Meta-KV groups of a distill
        consolidation; one adapter of per-experience LoRA); ``trainable_params_by_phase`` is what
        each phase of the latest experience trained.
        """
        return {
            "trainable_params": self.trainable_params,
            "trainable_params_by_phase": dict(self.trainable_counts),
            "train_tokens": self.throughput.tokens,
            "train_seconds": self.throughput.seconds,
            "train_tokens_per_s": self.throughput.tokens_per_second,
        } | {key: value for plugin in self.method_plugins for key, value in plugin.report_extra(self).items()}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """What this strategy must keep across a restart (model weights are saved separately).

        Returns:
            A picklable dict: counters, metrics and every method plugin's state.
        """
        return {
            "trained_experiences": self.trained_experiences,
            "clock": copy.deepcopy(vars(self.clock)),
            "matrix_metric": copy.deepcopy(vars(self.matrix_metric)) if self.matrix_metric is not None else None,
            "throughput": self.throughput.state_dict(),
            "log_steps": self.log_steps.state_dict(),
            "trainable_params": self.trainable_params,
            "plugins": [{"type": type(p).__name__, "state": p.state_dict()} for p in self.method_plugins],
            "unsaved_plugins": [type(p).__name__ for p in self.plugins_without_saved_state()],
        }

    def plugins_without_saved_state(self) -> list:
        """Avalanche plugins whose state :meth:`state_dict` cannot save (a ``ReplayPlugin``'s buffer,
        an ``EWCPlugin``'s importances): a resumed stream would run them from scratch."""
        return [p for p in self.plugins if not isinstance(p, MethodPlugin) and p is not self.evaluator
                and p is not self.clock]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; rebuilds model structure before weights load."""
        unsaved = state.get("unsaved_plugins", [])
        if unsaved and state["trained_experiences"] > 0:
            raise ValueError(
                f"cannot resume: the stream ran with Avalanche plugins whose state is not saved ({', '.join(unsaved)}), "
                "so a resumed run would differ from an uninterrupted one; start the run again"
            )
        self.trained_experiences = int(state["trained_experiences"])
        vars(self.clock).update(state["clock"])
        if self.matrix_metric is not None and state.get("matrix_metric") is not None:
            vars(self.matrix_metric).update(state["matrix_metric"])
        if "throughput" in state:  # absent from streams saved before it was measured
            self.throughput.load_state_dict(state["throughput"])
        if "log_steps" in state:  # absent from streams saved before logged steps ran on across fits
            self.log_steps.load_state_dict(state["log_steps"])
        self.trainable_params = int(state.get("trainable_params", 0))  # absent from older stream states
        saved = [entry["type"] for entry in state["plugins"]]
        ours = [type(p).__name__ for p in self.method_plugins]
        if saved != ours:
            raise ValueError(f"the saved state holds the plugins {saved}, this strategy has {ours}; use the same plugins")
        for plugin, entry in zip(self.method_plugins, state["plugins"]):
            plugin.load_state_dict(entry["state"])
