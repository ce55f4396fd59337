"""Distillation on language-model outputs: token-level KL to a teacher, and frozen teachers.

A teacher here is the *same* network evaluated with other parameter values
(:class:`ParameterSnapshot`, through ``torch.func.functional_call``): the model as it was
after an earlier experience (LwF), or before a consolidation (Meta-KV). No second copy of the
architecture is built, only the snapshotted tensors are kept.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from metakv_cl.data.collate import IGNORE_INDEX


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` bool: positions whose output predicts a label token (the causal-LM shift)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def token_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) of the softened next-token distributions, summed over ``mask``.

    Args:
        student_logits: ``[N, L, V]``.
        teacher_logits: ``[N, L, V]`` (no gradient needed).
        mask: ``[N, L]`` positions to include.
        temperature: softening temperature T; the KL is scaled by T^2 (Hinton et al.) so its
            gradient magnitude does not depend on T.

    Returns:
        ``(kl_sum, position_count)``.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1) * temperature**2
    mask = mask.to(kl.dtype)
    return (kl * mask).sum(), mask.sum()


class ParameterSnapshot:
    """Frozen copies of (some of) a model's parameters, to run the model as it was.

    Args:
        model: the model whose parameters are copied.
        names: parameter names (as in ``model.named_parameters()``) to copy; default all.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        parameters = dict(model.named_parameters())
        selected = list(parameters) if names is None else list(names)
        missing = [name for name in selected if name not in parameters]
        if missing:
            raise KeyError(f"the model has no parameters {missing[:3]}")
        self.tensors = {name: parameters[name].detach().clone() for name in selected}

    def to(self, device: torch.device) -> "ParameterSnapshot":
        for name, tensor in self.tensors.items():
            if tensor.device != device:
                self.tensors[name] = tensor.to(device)
        return self

    @torch.no_grad()
    def forward(self, model: nn.Module, **inputs: Any) -> Any:
        """``model(**inputs)`` with the snapshotted values in place of the current ones."""
        device = next(iter(self.tensors.values())).device if self.tensors else None
        target = inputs["input_ids"].device
        if device is not None and device != target:
            self.to(target)
        return torch.func.functional_call(model, self.tensors, args=(), kwargs=inputs, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.cpu() for name, tensor in self.tensors.items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "ParameterSnapshot":
        snapshot = cls.__new__(cls)
        snapshot.tensors = dict(tensors)
        return snapshot
