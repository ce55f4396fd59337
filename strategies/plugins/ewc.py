"""Elastic Weight Consolidation on the language-modelling loss (Kirkpatrick et al. 2017).

After each experience the diagonal empirical Fisher information of the LM loss is estimated on
that experience's training data: the mean over training examples of the squared gradient of
that example's own loss (its token-mean NLL). Later experiences add the penalty
``ewc_lambda * sum_i F_i (theta_i - theta*_i)^2``.

The per-example gradients come from a loop over single examples, not ``torch.func``'s
``vmap(grad(...))``: transformers builds GPT-2's and Llama's attention masks with data-dependent
control flow, which vmap cannot trace.

This estimate changes EWC's results by design: the Fisher used to be the mean of squared
mini-batch-mean gradients, which is smaller by up to the batch size (the noise of single examples
averages out inside a mini-batch), so the same ``ewc_lambda`` now penalises more.

* ``mode="separate"`` keeps one (Fisher, anchor) pair per past experience;
* ``mode="online"`` (Schwarz et al. 2018) keeps one pair: ``F <- decay_factor * F + F_new``,
  anchored at the latest weights.

Under DDP every rank estimates the Fisher on its shard and the sums are all-reduced, so all
ranks hold the same penalty.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from metakv_cl.data.scoring import sequence_nll
from metakv_cl.strategies.plugins.base import MethodPlugin
from metakv_cl.training.passes import all_reduce_sum, compute_device, on_device, shard_loader, to_device

EWC_MODES = ("separate", "online")


class QuadraticPenalty(torch.autograd.Function):
    """``sum_i F_i (theta_i - a_i)^2`` over lists of tensors, with its gradient ``2 F (theta - a)``.

    Written with multi-tensor (foreach) kernels in both directions: autograd through per-tensor
    expressions launched about ten kernels per parameter tensor and step (54 ms for SmolLM2's 272
    tensors on an H100), which made EWC's eager steps host-bound.
    """

    @staticmethod
    def forward(ctx, anchors: list[torch.Tensor], fisher: list[torch.Tensor], *parameters: torch.Tensor) -> torch.Tensor:
        differences = torch._foreach_sub(list(parameters), anchors)
        ctx.save_for_backward(*torch._foreach_mul(differences, fisher))  # F (theta - a): the gradient's half
        # sum F d^2 as squared norms of sqrt(F) d: one reduction kernel per chunk of tensors
        norms = torch._foreach_norm(torch._foreach_mul(differences, torch._foreach_sqrt(fisher)))
        return torch.stack(norms).float().square().sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        return (None, None, *torch._foreach_mul(list(ctx.saved_tensors), 2.0 * grad_output))


class EWC(MethodPlugin):
    """EWC with the Fisher information of the language-modelling loss.

    Args:
        ewc_lambda: penalty strength. The Fisher of a token-averaged LM loss is small, so useful
            values are large: on the quickstart stream, with the former mini-batch Fisher,
            1e3 / 1e4 / 1e5 gave forgetting 1.3 / 0.8 / 0.5 nats and a final mean loss of
            5.89 / 5.57 / 5.59 (naive: 2.5 and 6.68).
        mode: ``"separate"`` or ``"online"``.
        decay_factor: online mode: how much of the old Fisher is kept at each experience.
        fisher_batches: estimate the Fisher on at most ``fisher_batches * train_mb_size``
            examples per rank (the first mini-batches of the experience, in order; default: every
            example of the experience). Each example costs one forward and backward pass.

    Raises:
        ValueError: an unknown mode, or a weight or factor out of its range.
    """

    exclusive = ("EWC penalty",)

    def __init__(
        self,
        ewc_lambda: float = 1e4,
        mode: Literal["separate", "online"] = "separate",
        decay_factor: float = 0.9,
        fisher_batches: int | None = None,
    ):
        if mode not in EWC_MODES:
            raise ValueError(f"unknown EWC mode {mode!r}; choose one of {', '.join(EWC_MODES)}")
        if not 0 <= ewc_lambda < math.inf:  # also refuses NaN
            raise ValueError(f"ewc_lambda must be a finite number >= 0, got {ewc_lambda}")
        if not 0.0 <= decay_factor <= 1.0:
            raise ValueError(f"decay_factor must be in [0, 1], got {decay_factor}")
        super().__init__()
        self.ewc_lambda, self.mode, self.decay_factor = ewc_lambda, mode, decay_factor
        self.fisher_batches = fisher_batches
        # (anchor weights, Fisher diagonal) per past experience (one pair in online mode)
        self.importances: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    @property
    def method_name(self) -> str:
        return f"ewc-{self.mode}"

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        if self.importances:
            strategy.module.penalties["ewc"] = self.penalty

    def penalty(self, module, batch: dict, outputs: Any) -> torch.Tensor:
        """``ewc_lambda * sum F (theta - theta*)^2`` over every stored importance."""
        parameters = dict(module.model.named_parameters())
        device = next(iter(parameters.values())).device
        total = torch.zeros((), device=device)
        for anchors, fisher in self._importances_on(device):
            names = list(fisher)
            total = total + QuadraticPenalty.apply(
                [anchors[n] for n in names], [fisher[n] for n in names], *(parameters[n] for n in names)
            )
        return self.ewc_lambda * total

    def _importances_on(self, device: torch.device):
        for anchors, fisher in self.importances:
            for store in (anchors, fisher):
                for name, tensor in store.items():
                    if tensor.device != device:
                        store[name] = tensor.to(device)
        return self.importances

    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        fisher = self.estimate_fisher(strategy, strategy.experience.dataset)
        parameters = dict(strategy.module.model.named_parameters())
        anchors = {name: parameters[name].detach().clone() for name in fisher}
        if self.mode == "online" and self.importances:
            _, previous = self.importances[0]
            fisher = {name: self.decay_factor * previous[name].to(value.device) + value for name, value in fisher.items()}
            self.importances = [(anchors, fisher)]
        else:
            self.importances.append((anchors, fisher))

    def estimate_fisher(self, strategy, dataset) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the LM loss of ``strategy``'s model on ``dataset`` (all
        ranks agree on it): the mean over examples of the squared gradient of each example's
        token-mean NLL.

        Returns:
            Parameter name -> mean squared per-example gradient, for every trainable parameter.

        Raises:
            ValueError: the model has no trainable parameter.
        """
        module = strategy.module
        model = module.model
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not parameters:
            raise ValueError(f"{strategy.experience_label()}: EWC found no trainable parameter")
        device = compute_device(strategy.trainer_kwargs)
        was_training = module.training
        with on_device(module, device):
            module.eval()  # no dropout: the Fisher of the deterministic model
            sums = [torch.zeros_like(p) for p in parameters.values()]
            examples = torch.zeros((), device=device)
            for index, batch in enumerate(shard_loader(dataset, strategy.train_mb_size)):
                if self.fisher_batches is not None and index >= self.fisher_batches:
                    break
                batch = to_device(batch, device)
                for row in range(batch["input_ids"].shape[0]):
                    gradients = example_gradients(model, list(parameters.values()), batch, row)
                    torch._foreach_addcmul_(sums, gradients, gradients)  # sums += gradient^2, one kernel per chunk
                    examples += 1
            all_reduce_sum(examples)
            examples = examples.clamp_min(1)
            fisher = {name: (all_reduce_sum(total) / examples).cpu() for name, total in zip(parameters, sums)}
        module.train(was_training)
        return fisher

    def state_dict(self) -> dict[str, Any]:
        return {
            "importances": [
                ({n: t.cpu() for n, t in anchors.items()}, {n: t.cpu() for n, t in fisher.items()})
                for anchors, fisher in self.importances
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importances = [(dict(anchors), dict(fisher)) for anchors, fisher in state["importances"]]


def example_gradients(model, parameters: list[torch.Tensor], batch: dict, row: int) -> tuple[torch.Tensor, ...]:
    """Gradient of one example's token-mean NLL with respect to ``parameters``.

    Args:
        model: the causal LM.
        parameters: parameters of ``model`` to differentiate.
        batch: a padded batch (``input_ids``, ``attention_mask``, ``labels``).
        row: the example's row; its padding is dropped, so the gradient does not depend on
            what the example was batched with.

    Returns:
        One gradient per parameter (zeros for a parameter the loss does not reach).
    """
    kept = batch["attention_mask"][row].bool()
    input_ids, labels = batch["input_ids"][row, kept][None], batch["labels"][row, kept][None]
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    nll, count = sequence_nll(logits, labels)
    loss = nll.sum() / count.sum().clamp_min(1)
    return torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
