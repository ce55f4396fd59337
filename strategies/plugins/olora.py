"""O-LoRA: one LoRA adapter per experience, each in a subspace orthogonal to the earlier ones.

Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning" (Findings
of EMNLP 2023). Experience k trains a new peft adapter ``exp_k`` on the target modules; the
adapters of earlier experiences are frozen and stay active, so the model is the base plus the sum
of every adapter's delta (no task identity at test time). The training loss adds

    lambda_orth * sum_{j < k} sum_{adapted modules} |A_j A_k^T|_1  +  lambda_l2 * ||theta_k||^2

where ``A`` is peft's ``lora_A`` (rank x in_features): its rows span the inputs an adapter reads,
so the first term pushes the new adapter to read a subspace the earlier adapters do not, and its
update leaves their inputs alone. ``theta_k`` are the new adapter's A and B matrices. The paper's
defaults: ``lambda_orth`` (its lambda_1) 0.5, ``lambda_l2`` (lambda_2) 0, rank 8.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import metakv_cl  # noqa: F401  (torchvision import fix before peft loads)
from peft.tuners.lora import LoraLayer

from metakv_cl.strategies.plugins.lora import LoRA


class OLoRA(LoRA):
    """O-LoRA: per-experience LoRA adapters with the orthogonality and L2 terms of Wang et al. 2023.

    The adapters are :class:`~metakv_cl.strategies.plugins.lora.LoRA`'s in ``per_experience``
    mode: the same set-up and freezing, and the same saved state (the adapters' names, rebuilt
    on resume before the weights load).

    Args:
        rank: rank of every adapter.
        alpha: LoRA alpha (scale alpha / rank).
        dropout: LoRA dropout.
        target_modules: linear module name suffixes to adapt (default: the model family's ``lora_targets``, as for
            :class:`~metakv_cl.strategies.plugins.lora.LoRA`: GPT-2's ``c_attn``, Llama's Q and V).
        lambda_orth: weight of the orthogonality term (the paper's lambda_1).
        lambda_l2: weight of the squared L2 norm of the new adapter (the paper's lambda_2).

    Raises:
        ValueError: a rank < 1, a weight that is negative or not finite; when an experience
            starts, a target module that is not a linear projection (it has no ``A`` to compare).
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        lambda_orth: float = 0.5,
        lambda_l2: float = 0.0,
    ):
        for key, value in (("lambda_orth", lambda_orth), ("lambda_l2", lambda_l2)):
            if not 0 <= value < math.inf:  # also refuses NaN
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
        super().__init__(mode="per_experience", rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
        self.lambda_orth, self.lambda_l2 = lambda_orth, lambda_l2

    @property
    def method_name(self) -> str:
        return "olora"

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)  # adds and trains adapter exp_k alone
        for name, module in strategy.module.model.named_modules():
            if isinstance(module, LoraLayer) and self.adapters[-1] in module.lora_embedding_A:
                raise ValueError(
                    f"OLoRA target_modules: {name} is an embedding; O-LoRA compares the A matrices of "
                    "linear projections, so target those (e.g. q_proj, v_proj, c_attn)"
                )
        strategy.module.penalties["olora"] = self.penalty

    def adapted_layers(self, model) -> list[LoraLayer]:
        """The LoRA layers of ``model`` that hold the newest adapter."""
        return [m for m in model.modules() if isinstance(m, LoraLayer) and self.adapters[-1] in m.lora_A]

    def orthogonality(self, model) -> torch.Tensor:
        """``sum_j sum_modules |A_j A_new^T|_1`` over the earlier adapters j (0 for the first adapter).

        The earlier A matrices are detached: the term moves only the new adapter.
        """
        *earlier, newest = self.adapters
        layers = self.adapted_layers(model)
        total = layers[0].lora_A[newest].weight.new_zeros(())
        if not earlier:
            return total
        for layer in layers:
            previous = torch.cat([layer.lora_A[name].weight for name in earlier]).detach()
            total = total + (previous @ layer.lora_A[newest].weight.T).abs().sum()
        return total

    def l2(self, model) -> torch.Tensor:
        """Squared L2 norm of the newest adapter's A and B matrices."""
        newest = self.adapters[-1]
        return sum(layer.lora_A[newest].weight.square().sum() + layer.lora_B[newest].weight.square().sum()
                   for layer in self.adapted_layers(model))

    def penalty(self, module, batch: dict, outputs: Any) -> torch.Tensor:
        """``lambda_orth * orthogonality + lambda_l2 * l2`` of the module's model."""
        total = self.lambda_orth * self.orthogonality(module.model)
        if self.lambda_l2:  # 0 by default: skip the pass over the adapter's weights
            total = total + self.lambda_l2 * self.l2(module.model)
        return total
