"""Learning without Forgetting on language-model outputs (Li & Hoiem 2017).

While learning experience k, the model is also pulled towards the next-token distributions of
the model as it was after experience k-1, on the new experience's label tokens:
``loss = LM loss + alpha * T^2 KL(p_old^T || p_new^T)``. The old model is a parameter
snapshot evaluated through the same network (no second model object).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metakv_cl.strategies.plugins.base import MethodPlugin
from metakv_cl.training.distillation import ParameterSnapshot, prediction_mask, token_kl
from metakv_cl.training.packing import model_inputs


class LwF(MethodPlugin):
    """LwF with KL distillation of the previous model's next-token distributions.

    Args:
        alpha: weight of the distillation term.
        temperature: softening temperature T.

    Raises:
        ValueError: ``alpha`` or ``temperature`` out of range.
    """

    exclusive = ("LwF teacher",)

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        if not 0 <= alpha < math.inf:  # also refuses NaN
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        super().__init__()
        self.alpha, self.temperature = alpha, temperature
        self.teacher: ParameterSnapshot | None = None

    @property
    def method_name(self) -> str:
        return "lwf"

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        if self.teacher is not None:
            strategy.module.penalties["distillation"] = self.penalty

    def penalty(self, module, batch: dict, outputs: Any) -> torch.Tensor:
        """``alpha`` x the token-mean KL from the previous model to the current one on ``batch``."""
        teacher = self.teacher.forward(module.model, **model_inputs(batch))
        kl_sum, count = token_kl(outputs.logits, teacher.logits, prediction_mask(batch["labels"]), self.temperature)
        return self.alpha * module.token_mean(kl_sum, count)

    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        self.teacher = ParameterSnapshot(strategy.module.model)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict() if self.teacher is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        teacher = state.get("teacher")
        self.teacher = ParameterSnapshot.from_state_dict(teacher) if teacher is not None else None
