"""What a method plugin is: an Avalanche plugin that a :class:`ContinualStrategy` also asks about
its dataset, its fits and its state.

A method plugin reacts to Avalanche's events like any ``SupervisedPlugin`` (``before_training_exp``,
``after_training_exp``, ...) and may implement the hooks below, which the strategy calls in plugin
order:

* :meth:`MethodPlugin.attach` when the strategy is built (the plugin checks the model and the
  other plugins, and refuses what cannot work);
* :meth:`MethodPlugin.adapt_train_dataset` while the experience's dataset is adapted (replay adds
  its buffer);
* :meth:`MethodPlugin.train_experience`, for the one plugin that owns the experience's fits
  (``owns_training``; Meta-KV consolidation has a fast and a consolidation phase);
* :meth:`MethodPlugin.configure_fit` / :meth:`MethodPlugin.finish_fit` around each Lightning fit
  (the validated schedule holds items out and adds its callbacks);
* :meth:`MethodPlugin.state_dict` / :meth:`MethodPlugin.load_state_dict` for a resumed stream,
  and :meth:`MethodPlugin.report_extra` for the report.

Two plugins that hold the same resource (:attr:`MethodPlugin.exclusive`: a replay buffer, the
model's peft adapters, ...) cannot be combined: :func:`check_conflicts` names both.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import metakv_cl  # noqa: F401  (torchvision import fix before avalanche loads)
import pytorch_lightning as pl
from avalanche.training.plugins import (
    BiCPlugin,
    CoPEPlugin,
    CWRStarPlugin,
    EWCPlugin,
    GDumbPlugin,
    GenerativeReplayPlugin,
    LwFPlugin,
    ReplayPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.plugins.strategy_plugin import SupervisedPlugin

if TYPE_CHECKING:
    from metakv_cl.strategies.base import ContinualStrategy


class PluginConflictError(ValueError):
    """Two plugins of one strategy hold the same resource."""


class UnsupportedPluginError(ValueError):
    """An Avalanche plugin that cannot work on a language model."""


@dataclasses.dataclass
class PhaseFit:
    """One Lightning fit of an experience, as plugins may reshape it before it runs.

    Attributes:
        phase: the phase name (its checkpoint folder), e.g. ``"train"`` or ``"consolidate"``.
        dataset: the items to train on.
        max_epochs: epochs of the fit (None: the Trainer's ``max_epochs``).
        callbacks: extra Lightning callbacks of this fit.
        validation: held-out items validated after every epoch, or None.
        trainer: the finished Trainer (set after the fit).
        epochs_used: epochs the fit's result stands for (set after the fit: the epochs run, or the
            best epoch of a validated fit).
    """

    phase: str
    dataset: Any
    max_epochs: int | None = None
    callbacks: list[pl.Callback] = dataclasses.field(default_factory=list)
    validation: Any = None
    trainer: pl.Trainer | None = None
    epochs_used: int | None = None


class MethodPlugin(SupervisedPlugin):
    """Base of this package's method plugins (replay, EWC, LwF, LoRA, Meta-KV consolidation, ...).

    Subclasses set :attr:`exclusive` and :attr:`owns_training` and override the hooks they need.
    """

    #: resources this plugin holds alone; a second plugin naming one of them conflicts with it
    exclusive: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`train_experience` replaces the strategy's one ``"train"`` fit
    owns_training: ClassVar[bool] = False
    #: whether the method trains Meta-KV attention (``compare`` keeps Meta-KV on its model)
    uses_meta_kv: ClassVar[bool] = False

    @property
    def method_name(self) -> str:
        """This plugin's part of a method name in reports (``""``: it names nothing)."""
        return ""

    def attach(self, strategy: "ContinualStrategy") -> None:
        """Check this plugin against the strategy it is given to (model, options).

        Raises:
            ValueError: the combination cannot work (the message says why).
        """

    def adapt_train_dataset(self, strategy: "ContinualStrategy", dataset):
        """The experience's training items as this plugin wants them (default: unchanged)."""
        return dataset

    def train_experience(self, strategy: "ContinualStrategy") -> None:
        """The fits of one experience (only called on the plugin that ``owns_training``)."""
        raise NotImplementedError(f"{type(self).__name__} does not own the training schedule")

    def configure_fit(self, strategy: "ContinualStrategy", fit: PhaseFit) -> None:
        """Reshape a fit before it runs (held-out items, callbacks); default: nothing."""

    def finish_fit(self, strategy: "ContinualStrategy", fit: PhaseFit) -> None:
        """Read the finished fit (``fit.trainer``); default: nothing."""

    def report_extra(self, strategy: "ContinualStrategy") -> dict[str, Any]:
        """Facts about the run for the report's ``extra``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What this plugin must keep across a restart (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


# Avalanche's own plugins that hold one of the resources of this package's method plugins.
AVALANCHE_EXCLUSIVE: dict[type, tuple[str, ...]] = {
    ReplayPlugin: ("replay buffer",),
    EWCPlugin: ("EWC penalty",),
    SynapticIntelligencePlugin: ("SI penalty",),
}


# Avalanche plugins that need a classifier: what each one reads that a causal LM does not have.
CLASSIFIER_ONLY_PLUGINS: dict[type, str] = {
    LwFPlugin: (
        "it distils the class units out[:, classes] of [batch, classes] logits, the classes read from the "
        "experience's targets; an LM's outputs are next-token distributions (use metakv_cl.strategies.plugins.LwF)"
    ),
    CWRStarPlugin: "it consolidates the per-class rows of a classifier layer",
    GDumbPlugin: "it balances its buffer over class targets, which LM items do not have",
    BiCPlugin: "it trains a bias-correction layer over the logits of old and new classes",
    CoPEPlugin: "it replaces the logits by class prototypes in an embedding space",
    GenerativeReplayPlugin: "it replays samples of a generator labelled by a classifier",
}


def check_supported(plugins: Sequence[Any]) -> None:
    """Refuse Avalanche plugins that cannot work on a language model.

    Raises:
        UnsupportedPluginError: naming the plugin and why.
    """
    for index, plugin in enumerate(plugins):
        for cls, reason in CLASSIFIER_ONLY_PLUGINS.items():
            if isinstance(plugin, cls):
                raise UnsupportedPluginError(
                    f"plugins[{index}] {type(plugin).__name__} cannot train a language model: {reason}"
                )


def check_conflicts(plugins: Sequence[Any]) -> None:
    """Refuse two plugins that hold the same resource, or two that own the training schedule.

    Raises:
        PluginConflictError: naming both plugins and the resource.
    """
    holders: dict[str, tuple[int, Any]] = {}
    for index, plugin in enumerate(plugins):
        resources = getattr(plugin, "exclusive", None)
        if resources is None:
            resources = next((held for cls, held in AVALANCHE_EXCLUSIVE.items() if isinstance(plugin, cls)), ())
        if getattr(plugin, "owns_training", False):
            resources = (*resources, "training schedule")
        for resource in resources:
            if resource in holders:
                first_index, first = holders[resource]
                raise PluginConflictError(
                    f"plugins[{first_index}] {type(first).__name__} and plugins[{index}] {type(plugin).__name__} "
                    f"both hold the {resource}; keep one of them"
                )
            holders[resource] = (index, plugin)
