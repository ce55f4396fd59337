"""LoRA adapters with peft: one shared adapter, or a new adapter per experience.

The base model is frozen; only LoRA matrices train (peft's ``LoraModel``).

* ``mode="shared"``: one adapter, trained sequentially on every experience (it forgets like
  fine-tuning does, within its low-rank budget).
* ``mode="per_experience"``: experience k adds adapter ``exp_k``; earlier adapters stay active
  but frozen, so the model is the sum of all adapters (no task identity needed at test time).
  With ``route_by_experience=True`` each adapter is trained alone on the base model and the
  test set of experience j is scored with adapter ``exp_j`` alone (task-aware inference:
  parameter isolation, no forgetting by construction; experiences not trained yet are scored
  with every adapter so far).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import metakv_cl  # noqa: F401  (torchvision import fix before peft loads)
from peft import LoraConfig, LoraModel

from metakv_cl.modeling.families import model_family
from metakv_cl.strategies.plugins.base import MethodPlugin

LORA_MODES = ("shared", "per_experience")


def make_lora_config(
    model, rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] | None = None
) -> LoraConfig:
    """A peft ``LoraConfig`` for ``model`` (GPT-2's Conv1D projections need ``fan_in_fan_out``).

    Args:
        model: the model the adapter goes on, of a registered family (:mod:`metakv_cl.modeling.families`).
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: LoRA dropout.
        target_modules: module name suffixes to adapt; default: the family's ``lora_targets``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    family = model_family(model)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or family.lora_targets),
        fan_in_fan_out=family.conv1d,
        bias="none",
    )


def add_lora_adapter(module, name: str, config: LoraConfig) -> LoraModel:
    """Add adapter ``name`` to ``module.model``, wrapping it in a peft ``LoraModel`` if needed.

    peft freezes every non-LoRA parameter when it injects an adapter.

    Returns:
        The ``LoraModel`` (also ``module.model``).
    """
    if isinstance(module.model, LoraModel):
        module.model.peft_config[name] = config
        module.model.inject_adapter(module.model.model, name)
    else:
        module.model = LoraModel(module.model, config, name)
    return module.model


def remove_lora(module) -> None:
    """Take every LoRA adapter off ``module.model`` (without merging): back to the plain model."""
    if isinstance(module.model, LoraModel):
        module.model = module.model.unload()


class LoRA(MethodPlugin):
    """LoRA fine-tuning, shared or per experience.

    Args:
        mode: ``"shared"`` or ``"per_experience"``.
        rank: LoRA rank.
        alpha: LoRA alpha (scale alpha / rank).
        dropout: LoRA dropout.
        target_modules: module name suffixes to adapt (default: the model family's ``lora_targets``,
            e.g. GPT-2's ``c_attn``).
        route_by_experience: per-experience mode only: score experience j with adapter j alone.

    Raises:
        ValueError: an unknown mode, routing without per-experience adapters, or a rank < 1.
    """

    exclusive = ("peft adapters",)

    def __init__(
        self,
        mode: Literal["shared", "per_experience"] = "shared",
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        route_by_experience: bool = False,
    ):
        if mode not in LORA_MODES:
            raise ValueError(f"unknown LoRA mode {mode!r}; choose one of {', '.join(LORA_MODES)}")
        if route_by_experience and mode != "per_experience":
            raise ValueError("route_by_experience needs mode='per_experience' (one adapter per experience)")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        super().__init__()
        self.mode, self.rank, self.alpha, self.dropout = mode, rank, alpha, dropout
        self.target_modules = target_modules
        self.route_by_experience = route_by_experience
        self.adapters: list[str] = []
        self._module = None

    @property
    def method_name(self) -> str:
        name = f"lora-{self.mode.replace('_', '-')}"
        return name + "-routed" if self.route_by_experience else name

    def attach(self, strategy) -> None:
        self._module = strategy.module  # load_state_dict rebuilds the adapters on it
        make_lora_config(strategy.module.model, self.rank, self.alpha, self.dropout, self.target_modules)

    def add_adapter(self, name: str) -> None:
        """Add a fresh adapter ``name`` (B = 0: the model's outputs do not change) and record it."""
        config = make_lora_config(self._module.model, self.rank, self.alpha, self.dropout, self.target_modules)
        add_lora_adapter(self._module, name, config)
        self.adapters.append(name)

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        if self.mode == "per_experience" or not self.adapters:
            self.add_adapter(f"exp_{strategy.experience_index}" if self.mode == "per_experience" else "shared")
        model = strategy.module.model
        if self.route_by_experience:
            model.set_adapter([self.adapters[-1]])  # trained alone, as it will be used at test time
            return
        model.set_adapter(list(self.adapters))  # all active; set_adapter makes them trainable
        if self.mode == "per_experience":
            model.set_requires_grad(self.adapters[:-1], requires_grad=False)

    def before_eval_exp(self, strategy, **kwargs: Any) -> None:
        index = int(strategy.experience.current_experience)
        if self.route_by_experience and index < len(self.adapters):
            strategy.module.model.set_adapter([self.adapters[index]], inference_mode=True)

    def after_eval_exp(self, strategy, **kwargs: Any) -> None:
        if self.route_by_experience and self.adapters:
            strategy.module.model.set_adapter(list(self.adapters), inference_mode=True)

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in state["adapters"]:
            if name not in self.adapters:
                self.add_adapter(name)
        if self.adapters:
            self._module.model.set_adapter(list(self.adapters), inference_mode=True)
