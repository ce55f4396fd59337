"""Meta-KV consolidation: what an experience taught is consolidated into the Meta-KV state M.

The model carries Meta-KV attention whose meta-state includes the consolidated state M
(``MetaKVConfig(source="consolidated")`` or ``"hybrid"``). The base model stays frozen for the
whole stream (it should be pretrained, or warmed up on the warm-up stream); only the Meta-KV
groups ``consolidate_groups`` (``"memory"`` = M, ``"generator"`` = the maps from M to the K/V
modulation, ``"source"``) change between experiences. Two modes:

* ``"replay"`` (the default): M is trained with the LM loss on the replay buffer of earlier
  experiences together with the new data.
* ``"distill"``: first a **fast phase** learns the new experience in fast weights (a fresh peft
  LoRA adapter; M frozen); then M is trained so that the model *without* fast weights matches a
  teacher: on the new items the model *with* the fast weights (as it was after the fast phase),
  on replayed items of earlier experiences the previous consolidated model (M before this
  consolidation); token-level KL at ``temperature``, plus ``lm_loss_weight`` x the LM loss.
  Then the fast weights are reset (the adapter is removed).

Consolidation trains on the experience's adapted dataset: with a
:class:`~metakv_cl.strategies.plugins.replay.Replay` plugin that is the new items plus its buffer
(the ``metakv`` preset always adds one), with a
:class:`~metakv_cl.strategies.plugins.validated.Validated` plugin the consolidation fit selects its
best epoch on held-out items. With an addressed bank (``source="addressed"``), a
:class:`~metakv_cl.strategies.plugins.bank_schedule.BankSchedule` plugin gives each experience its
own slots and protects the earlier ones. After each experience M's value is appended to
:attr:`MetaKVConsolidation.memory_history` (also written to ``<root>/memory_history.pt``).

How the defaults were chosen (``configs/metakv_ablation.yaml``: tiny GPT-2, warm-up topic + 3
synthetic topics, 3 epochs, buffer 48; final mean test loss, lower is better, seeds 0 / 1):
replay into M + generator 5.559 / 5.678; fast LoRA + distillation + LM loss 5.564 / 5.713 at
2-3x the compute; fast LoRA + pure distillation 5.689 / 5.737; consolidating M alone
(either mode) does not learn (8.03, the untrained level): M only sets a small core of the
modulation, so the generator has to be consolidated with it. Every variant had forgetting <= 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from metakv_cl.modeling import get_meta_kv, meta_kv_parameters
from metakv_cl.runfolder import atomic_torch_save
from metakv_cl.strategies.plugins.base import MethodPlugin, PluginConflictError
from metakv_cl.strategies.plugins.ewc import EWC
from metakv_cl.strategies.plugins.lora import add_lora_adapter, make_lora_config, remove_lora
from metakv_cl.training.distillation import ParameterSnapshot, prediction_mask, token_kl
from metakv_cl.training.passes import is_global_zero

CONSOLIDATION_MODES = ("distill", "replay")
FAST_WEIGHTS = ("lora", "none")
CONSOLIDATION_GROUPS = ("memory", "generator", "source")
FAST_ADAPTER = "fast"


class MetaKVConsolidation(MethodPlugin):
    """Fast weights per experience, consolidated into the Meta-KV state M between experiences.

    Args:
        mode: ``"replay"`` or ``"distill"`` (see the module docstring).
        fast_weights: ``"lora"`` (a fast LoRA phase first) or ``"none"``; default: ``"lora"``
            for distill, ``"none"`` for replay (the only combinations that make sense).
        consolidate_groups: Meta-KV parameter groups trained during consolidation
            (``"memory"`` is M; ``"generator"`` maps M to the K/V modulation; ``"source"``
            the dynamic source of a hybrid meta-state).
        fast_rank: rank of the fast LoRA adapter.
        fast_alpha: alpha of the fast LoRA adapter.
        fast_target_modules: modules the fast adapter adapts (default: the model family's ``lora_targets``).
        fast_epochs: epochs of the fast phase (default: the Trainer's ``max_epochs``).
        fast_lr: learning rate of the fast phase (default: the module's).
        consolidation_epochs: epochs of the consolidation (default: ``max_epochs``).
        consolidation_lr: learning rate of the consolidation (default: the module's).
        temperature: distillation temperature.
        lm_loss_weight: weight of the LM loss during consolidation (default 1; the KL term
            of distill mode comes on top).

    Raises:
        ValueError: an unknown mode, fast-weight kind or group, a mode that does not fit the
            fast weights, or a number out of range; on attaching, a model without Meta-KV (or
            without M when ``"memory"`` is consolidated) or packed batches in distill mode.
    """

    exclusive = ("peft adapters",)  # the fast adapter is removed with every adapter after each experience
    owns_training = True
    uses_meta_kv = True

    def __init__(
        self,
        mode: Literal["replay", "distill"] = "replay",
        fast_weights: Literal["lora", "none"] | None = None,
        consolidate_groups: Sequence[str] = ("memory", "generator"),
        fast_rank: int = 8,
        fast_alpha: float = 16.0,
        fast_target_modules: list[str] | None = None,
        fast_epochs: int | None = None,
        fast_lr: float | None = None,
        consolidation_epochs: int | None = None,
        consolidation_lr: float | None = None,
        temperature: float = 1.0,
        lm_loss_weight: float = 1.0,
    ):
        if mode not in CONSOLIDATION_MODES:
            raise ValueError(f"unknown consolidation mode {mode!r}; choose one of {', '.join(CONSOLIDATION_MODES)}")
        if fast_weights is None:
            fast_weights = "lora" if mode == "distill" else "none"
        if fast_weights not in FAST_WEIGHTS:
            raise ValueError(f"unknown fast_weights {fast_weights!r}; choose one of {', '.join(FAST_WEIGHTS)}")
        if mode == "distill" and fast_weights == "none":
            raise ValueError("mode='distill' distils the fast weights into M: it needs fast_weights='lora'")
        if mode == "replay" and fast_weights == "lora":
            raise ValueError("mode='replay' trains M directly on the buffer and the new data: set fast_weights='none'")
        unknown = sorted(set(consolidate_groups) - set(CONSOLIDATION_GROUPS))
        if unknown or not consolidate_groups:
            raise ValueError(f"consolidate_groups must be a non-empty subset of {CONSOLIDATION_GROUPS}, got {list(consolidate_groups)}")
        if not 0 < temperature < math.inf:  # also refuses NaN
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        for name, lr in (("fast_lr", fast_lr), ("consolidation_lr", consolidation_lr)):
            if lr is not None and not 0 < lr < math.inf:
                raise ValueError(f"{name} must be a finite number > 0 or null (the model's lr), got {lr}")
        if not 0 <= lm_loss_weight < math.inf:
            raise ValueError(f"lm_loss_weight must be a finite number >= 0, got {lm_loss_weight}")
        super().__init__()
        self.mode, self.fast_weights = mode, fast_weights
        self.consolidate_groups = tuple(consolidate_groups)
        self.fast_rank, self.fast_alpha, self.fast_target_modules = fast_rank, fast_alpha, fast_target_modules
        self.fast_epochs, self.fast_lr = fast_epochs, fast_lr
        self.consolidation_epochs, self.consolidation_lr = consolidation_epochs, consolidation_lr
        self.temperature, self.lm_loss_weight = temperature, lm_loss_weight
        self.consolidation_epochs_used: list[int] = []
        self.initial_memory: dict[str, torch.Tensor] | None = None
        self.memory_history: list[dict[str, torch.Tensor]] = []
        self._teacher: ParameterSnapshot | None = None
        self._experience_index: int | None = None

    @property
    def method_name(self) -> str:
        groups = "+".join(self.consolidate_groups)
        prefix = "metakv-fast-distill" if self.mode == "distill" else "metakv-replay"
        return prefix if groups == "memory+generator" else f"{prefix}-{groups}"

    def attach(self, strategy) -> None:
        ewc = next((index for index, plugin in enumerate(strategy.plugins) if isinstance(plugin, EWC)), None)
        if ewc is not None:
            first, second = sorted((ewc, strategy.plugins.index(self)))
            raise PluginConflictError(
                f"plugins[{first}] {type(strategy.plugins[first]).__name__} and plugins[{second}] "
                f"{type(strategy.plugins[second]).__name__} cannot be combined: consolidation freezes every "
                "parameter once its experience is trained, so EWC would find none to estimate its Fisher on"
            )
        if self.mode == "distill" and strategy.train_pack_length is not None:
            raise ValueError(
                "train_pack_length is not supported by MetaKVConsolidation with mode 'distill': its teachers "
                "are chosen per row by the row's experience, and a packed row mixes experiences"
            )
        meta_kv = _meta_kv_or_error(strategy.module.model)
        if "memory" in self.consolidate_groups and not (meta_kv.config.uses_memory or meta_kv.config.uses_bank):
            raise ValueError(
                f"consolidating 'memory' needs a Meta-KV meta-state with a memory: the consolidated state M "
                f"(source 'consolidated' or 'hybrid') or the addressed bank (source 'addressed'); "
                f"this model's source is {meta_kv.config.source!r}"
            )
        if "generator" not in self.consolidate_groups and not any(layer.modulation.B.any() for layer in meta_kv.layers):
            # delta = (X A(C)) B(C) with B = 0 has no gradient with respect to C, so neither has M
            raise ValueError(
                f"consolidate_groups={list(self.consolidate_groups)} cannot learn: the generator's B is still zero "
                "(its initial value) and is not consolidated, so the gradient of the loss with respect to M is "
                "exactly zero; add 'generator' to consolidate_groups"
            )

    # ------------------------------------------------------------------ parameters

    def consolidated_names(self, model) -> list[str]:
        """Names (in ``model``) of the parameters consolidation trains."""
        wanted = {id(p) for group in self.consolidate_groups for p in meta_kv_parameters(model, group)}
        return [name for name, p in model.named_parameters() if id(p) in wanted]

    @staticmethod
    def memory_state(model) -> dict[str, torch.Tensor]:
        """The current M of ``model`` (every parameter of the "memory" group), detached on the CPU."""
        memory = {id(p) for p in meta_kv_parameters(model, "memory")}
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in memory}

    @staticmethod
    def _train_only(model, names: Sequence[str]) -> None:
        selected = set(names)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in selected)

    # ------------------------------------------------------------------ the experience

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        if self.initial_memory is None:
            self.initial_memory = self.memory_state(strategy.module.model)

    def train_experience(self, strategy) -> None:
        module = strategy.module
        self._train_only(module.model, ())
        if self.fast_weights == "lora":
            config = make_lora_config(module.model, self.fast_rank, self.fast_alpha, 0.0, self.fast_target_modules)
            add_lora_adapter(module, FAST_ADAPTER, config)  # trainable; everything else frozen
            with module.phase(lr=self.fast_lr):
                strategy.fit_phase("fast", strategy.experience.dataset, max_epochs=self.fast_epochs)
        self.consolidate(strategy, strategy.adapted_dataset)
        remove_lora(module)  # reset the fast weights

    def consolidate(self, strategy, dataset) -> None:
        """Train the consolidated Meta-KV groups on ``dataset`` (new items + replayed items)."""
        module = strategy.module
        names = self.consolidated_names(module.model)
        self._train_only(module.model, names)
        penalties = {}
        if self.mode == "distill":
            self._teacher = ParameterSnapshot(module.model, names)  # M (and generator) before consolidation
            self._experience_index = strategy.experience_index
            module.model.disable_adapter_layers()  # the student has no fast weights
            penalties["consolidation"] = self.distillation_penalty
        try:
            with module.phase(lr=self.consolidation_lr, lm_loss_weight=self.lm_loss_weight, penalties=penalties):
                fit = strategy.fit_phase("consolidate", dataset, max_epochs=self.consolidation_epochs)
            self.consolidation_epochs_used.append(fit.epochs_used)
        finally:
            self._teacher = None
            self._train_only(module.model, ())

    def distillation_penalty(self, module, batch: dict, outputs: Any) -> torch.Tensor:
        """KL to the fast model on new items and to the previous consolidated model on replayed ones."""
        model = module.model
        is_new = batch["experience"] == self._experience_index
        teacher_logits = torch.empty_like(outputs.logits)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if bool(is_new.any()):
            model.enable_adapter_layers()
            try:
                subset = {key: value[is_new] for key, value in inputs.items()}
                teacher_logits[is_new] = self._teacher.forward(model, **subset).logits
            finally:
                model.disable_adapter_layers()
        if bool((~is_new).any()):
            subset = {key: value[~is_new] for key, value in inputs.items()}
            teacher_logits[~is_new] = self._teacher.forward(model, **subset).logits
        kl_sum, count = token_kl(outputs.logits, teacher_logits, prediction_mask(batch["labels"]), self.temperature)
        return module.token_mean(kl_sum, count)

    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        self.memory_history.append(self.memory_state(strategy.module.model))
        if is_global_zero():
            atomic_torch_save(
                {"initial": self.initial_memory, "after_experience": self.memory_history},
                Path(strategy.root_dir) / "memory_history.pt",
            )

    def report_extra(self, strategy) -> dict[str, Any]:
        previous = self.initial_memory
        drift = []
        for state in self.memory_history:
            drift.append(float(sum(((state[n] - previous[n]) ** 2).sum() for n in state) ** 0.5))
            previous = state
        return {
            "memory_drift_per_experience": drift,
            "consolidation_epochs_per_experience": list(self.consolidation_epochs_used),
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_memory": self.initial_memory,
            "memory_history": self.memory_history,
            "consolidation_epochs_used": self.consolidation_epochs_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_memory = state["initial_memory"]
        self.memory_history = list(state["memory_history"])
        self.consolidation_epochs_used = list(state.get("consolidation_epochs_used", []))


def _meta_kv_or_error(model):
    try:
        return get_meta_kv(model)
    except ValueError:
        raise ValueError(
            "MetaKVConsolidation needs a model with Meta-KV attention: set model.meta_kv "
            "(e.g. {source: consolidated, rank: 8}) on the ContinualLMModule"
        ) from None
