"""The LightningModule every strategy trains: a causal LM, its loss, extra loss terms, its optimiser.

:class:`ContinualLMModule` wraps a transformers causal LM (optionally with Meta-KV attention):

* training loss = ``lm_loss_weight`` x next-token cross-entropy (mean over the label tokens of
  the batch, and over all ranks under DDP: the token count is all-reduced, so a DDP run takes the
  same step as one process seeing the union of the ranks' batches) + the *penalty terms* that
  strategies register (EWC's quadratic anchor, LwF's distillation, consolidation objectives);
* a non-finite loss stops training with :class:`NonFiniteLossError` naming the experience, the
  step and every loss component. The losses are checked in windows
  (:attr:`ContinualLMModule.nonfinite_check_interval` steps, and at every epoch's last batch and
  the end of a fit), so the host waits for the device once per window, not at every step; the
  error still names the first non-finite step (the weights then hold the window's updates);
* validation = the score of one experience: token-weighted mean loss for language modelling
  (of the distribution an evaluation-time method puts in ``eval_scorer``, e.g. kNN-LM, if any),
  label-likelihood accuracy for classification (after the context an evaluation-time method puts
  before each prompt through ``eval_context``, e.g. retrieved in-context examples, if any; each
  prompt run once and its KV cache continued with every candidate; candidates ranked by summed
  or mean log-likelihood, ``ranking``), and
  with ``exact_match`` the share of items whose greedy decoding is the gold label, accumulated in
  torchmetrics ``SumMetric`` states so that DDP ranks (each seeing a shard) agree on the result
  (:attr:`eval_result`), and each item's outcome in test-set order (:attr:`eval_items`: the
  predicted and gold choice of a classification item, with ``exact_match`` whether its greedy
  decoding was the gold label, the summed NLL and token count of a text),
  gathered from every rank with the item's test-set position (the evaluation batch's ``index``:
  :class:`~metakv_cl.training.datamodule.EvaluationDataModule` serves items by length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

import metakv_cl  # noqa: F401  (torchvision import fix before transformers' models load)
import pytorch_lightning as pl
from torchmetrics.aggregation import SumMetric

from metakv_cl.data.collate import IGNORE_INDEX
from metakv_cl.data.scoring import (
    check_ranking,
    generated_exact_match,
    rank_choices,
    rank_choices_and_exact_match,
    rank_choices_with_shared_prompt,
    sequence_nll,
)
from metakv_cl.metrics import ItemRecords
from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.training.compilation import BlockCompiler
from metakv_cl.training.packing import model_inputs

LR_SCHEDULES = ("constant", "linear", "cosine")

# A penalty term: (module, batch, model outputs) -> scalar tensor added to the training loss.
Penalty = Callable[["ContinualLMModule", dict, Any], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class ContinualLMModule(pl.LightningModule):
    """A causal LM trained and evaluated experience by experience.

    Args:
        model: a model name or path for :func:`metakv_cl.hub.load_causal_lm` (``"gpt2"``,
            ``"smollm2-135m"``, a local directory), or an already built ``nn.Module``.
        from_scratch: build the named architecture with random weights (see ``load_causal_lm``).
        config_overrides: model config fields to change, e.g. ``{n_layer: 2, n_embd: 128}``.
        gguf_file: GGUF file inside the directory ``model``.
        dtype: parameter dtype name (``float32``, ``bfloat16``, ``float16``).
        vocab_size: vocabulary size of a from-scratch model (set by the stream when it uses its
            own compact or word-level vocabulary; ``None`` keeps the architecture's).
        meta_kv: add Meta-KV attention with this configuration (``None``: plain model).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        lr_schedule: ``"constant"``, ``"linear"`` (decay to 0) or ``"cosine"`` after warm-up,
            over the steps of one ``Trainer.fit`` (one experience or one phase).
        warmup_steps: linear warm-up steps of each fit.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        shared_prompt_scoring: score classification candidates on one shared prompt run
            (:func:`~metakv_cl.data.scoring.rank_choices_with_shared_prompt`); False scores
            full rows.
        ranking: how classification candidates are ranked: ``"sum"`` by the log-likelihood of
            the label string (summed over its tokens), ``"mean"`` by its mean per label token
            (length-normalised; :func:`~metakv_cl.data.scoring.best_choices`).
        exact_match: also score classification items by generative exact match: greedy decoding
            after the prompt must produce the gold label's tokens
            (:func:`~metakv_cl.data.scoring.generated_exact_match`); reported as
            ``eval_result["exact_match"]`` and per item as ``eval_items["generated_correct"]``.
        compile: run the training forward's transformer blocks through ``torch.compile``
            (:class:`~metakv_cl.training.compilation.BlockCompiler`: one graph per block class,
            compiled in seconds, reused by every layer; the Meta-KV hooks are traced with the
            blocks) and the loss over the logits. On a GPU this removes the host-side cost of eager
            training. Scoring language-modelling test sets runs the same compiled blocks (a graph
            of its own, without gradients); classification scoring, which runs KV caches, stays
            eager. Blocks swapped in later (a new model) compile their own callables.
    """

    #: training steps whose losses are queued on the device between two non-finite checks (each
    #: check waits for the device); an epoch's last batch and a fit's last step are always checked.
    nonfinite_check_interval: int = 32

    def __init__(
        self,
        model: str | nn.Module = "gpt2",
        *,
        from_scratch: bool = False,
        config_overrides: dict[str, Any] | None = None,
        gguf_file: str | None = None,
        dtype: str | None = None,
        vocab_size: int | None = None,
        meta_kv: MetaKVConfig | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
        attn_implementation: str = "sdpa",
        shared_prompt_scoring: bool = True,
        ranking: Literal["sum", "mean"] = "sum",
        exact_match: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        check_ranking(ranking)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if not (0 < lr < math.inf):  # also refuses NaN
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        if not (0 <= weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if isinstance(model, str):
            from metakv_cl.hub import load_causal_lm

            self.save_hyperparameters()
            overrides = dict(config_overrides or {})
            if vocab_size is not None:
                if not from_scratch:
                    raise ValueError(
                        f"vocab_size={vocab_size} needs from_scratch=True: a pretrained model keeps its "
                        "tokenizer's vocabulary (use the stream without compact_vocabulary / word-level)"
                    )
                overrides["vocab_size"] = vocab_size
            model = load_causal_lm(
                model,
                from_scratch=from_scratch,
                config_overrides=overrides,
                gguf_file=gguf_file,
                dtype=dtype,
                attn_implementation=attn_implementation,
            )
        elif vocab_size is not None and (getattr(getattr(model, "config", None), "vocab_size", None) or 0) < vocab_size:
            raise ValueError(f"the given model's vocabulary is smaller than vocab_size={vocab_size}")
        if meta_kv is not None:
            from metakv_cl.modeling import add_meta_kv

            add_meta_kv(model, meta_kv)
        self.model = model
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.penalties: dict[str, Penalty] = {}
        # (batch, outputs, loss) -> the loss to train: the strategy fires Avalanche's
        # after_forward / before_backward there, where plugins may add to the loss
        self.loss_hook: Callable[[dict, Any, torch.Tensor], torch.Tensor] | None = None
        # (model, batch) -> [batch, length, vocab] next-token logits or log-probabilities that score a
        # language-modelling evaluation batch in place of the model's logits (None: the model's). An
        # evaluation-time method sets it for its evaluations and clears it after (the KNNLM plugin).
        self.eval_scorer: Callable[[nn.Module, dict], torch.Tensor] | None = None
        # (model, batch) -> the classification evaluation batch with more context before every candidate
        # row's prompt, scored in its place (None: the batch as it is). An evaluation-time method sets
        # it for its evaluations and clears it after (the RetrievedExamples plugin's in-context examples).
        self.eval_context: Callable[[nn.Module, dict], dict] | None = None
        self.lm_loss_weight = 1.0
        self.experience_label = "(no experience)"
        # evaluation sums (synchronised across ranks by torchmetrics). Not MeanMetric: the token and
        # example counts are reported too, and a MeanMetric's float32 mean (of NLL per token x
        # tokens, for the loss) would round the reported loss and accuracy differently.
        self.eval_nll = SumMetric()
        self.eval_tokens = SumMetric()
        self.eval_correct = SumMetric()
        self.eval_examples = SumMetric()
        self.eval_generated_correct = SumMetric()
        self.eval_result: dict[str, float] = {}
        # per-item outcomes: (predicted, gold) choice per classification item, (nll, tokens) per text
        self.eval_choices = ItemRecords("predicted", "gold")
        self.eval_texts = ItemRecords("nll", "tokens")
        self.eval_generations = ItemRecords("generated_correct")
        self.eval_items: dict[str, Any] = {}
        self._num_choices = 0
        self.shared_prompt_scoring = shared_prompt_scoring
        self.ranking, self.exact_match = ranking, exact_match
        self._evaluating_classification = False
        self._shares_prompt = shared_prompt_scoring
        self.block_compiler = BlockCompiler() if compile else None
        # (global step, epoch, batch), component names, [loss, *components] of the unchecked steps
        self._loss_window: list[tuple[tuple[int | None, int | None, int], tuple[str, ...], torch.Tensor]] = []

    # ------------------------------------------------------------------ model access

    @property
    def max_positions(self) -> int | None:
        """The model's position limit (``n_positions`` / ``max_position_embeddings``), if it has one."""
        config = getattr(self.model, "config", None)
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(config, name, None)
            if value:
                return int(value)
        return None

    @property
    def vocab_size(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "vocab_size", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def settings(self) -> dict[str, Any]:
        """What this module was built and trains with, for reports (plain JSON values).

        The init arguments of a named model (none for a given ``nn.Module``), then the optimiser
        settings in use, the scoring settings (``ranking``, ``exact_match``) and ``meta_kv``: the
        Meta-KV configuration of the model (``None``: plain model).
        """
        from metakv_cl.modeling import get_meta_kv, has_meta_kv

        settings = {key: value for key, value in self.hparams.items() if key != "meta_kv"}
        settings.update(
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=list(self.betas),
            lr_schedule=self.lr_schedule,
            warmup_steps=self.warmup_steps,
            ranking=self.ranking,
            exact_match=self.exact_match,
            meta_kv=dataclasses.asdict(get_meta_kv(self.model).config) if has_meta_kv(self.model) else None,
        )
        return settings

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ objectives

    def token_mean(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``total / count`` where ``count`` is summed over all DDP ranks (times the world size).

        DDP averages gradients over ranks, so scaling by the world size makes the step equal to
        that of one process taking the mean over the union of the ranks' tokens.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            count = self.trainer.strategy.reduce(count.detach().float(), reduce_op="sum") / world
        return total / count.clamp_min(1)

    def lm_loss(self, batch: dict, outputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, nll_sum, token_count) of a batch with ``labels`` (compiled with the blocks)."""
        nll_of = token_nll if self.block_compiler is None else self.block_compiler.compiled(token_nll)
        nll, count = nll_of(outputs.logits, batch["labels"])
        total, tokens = nll.sum(), count.sum()
        return self.token_mean(total, tokens), total, tokens

    @contextlib.contextmanager
    def phase(
        self,
        *,
        lr: float | None = None,
        lm_loss_weight: float | None = None,
        penalties: dict[str, Penalty] | None = None,
    ) -> Iterator["ContinualLMModule"]:
        """Temporarily change the objective (for one ``Trainer.fit`` of a strategy phase).

        Args:
            lr: learning rate of this phase.
            lm_loss_weight: weight of the language-modelling loss (0 for pure distillation).
            penalties: extra penalty terms for this phase only.
        """
        saved = (self.lr, self.lm_loss_weight, dict(self.penalties))
        if lr is not None:
            self.lr = lr
        if lm_loss_weight is not None:
            self.lm_loss_weight = lm_loss_weight
        self.penalties.update(penalties or {})
        try:
            yield self
        finally:
            self.lr, self.lm_loss_weight, self.penalties = saved[0], saved[1], saved[2]

    # ------------------------------------------------------------------ training

    def batch_forward(self, **inputs: Any) -> Any:
        """The model's forward on a whole batch without a KV cache (a training batch's
        :func:`~metakv_cl.training.packing.model_inputs`, padded or packed, or a language-modelling
        test batch), compiled when ``compile`` was set."""
        if self.block_compiler is None:
            return self.model(**inputs)
        with self.block_compiler.active(self.model):
            return self.model(**inputs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self.batch_forward(**model_inputs(batch))
        lm_loss, nll_sum, tokens = self.lm_loss(batch, outputs)
        components = {"lm": lm_loss}
        loss = self.lm_loss_weight * lm_loss
        for name, penalty in self.penalties.items():
            value = penalty(self, batch, outputs)
            components[name] = value
            loss = loss + value
        if self.loss_hook is not None:
            hooked = self.loss_hook(batch, outputs, loss)
            if hooked is not loss:
                components["plugins"] = hooked - loss  # what Avalanche plugins added at before_backward
            loss = hooked
        self._watch_loss(loss, components, batch_idx)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/lm_loss", (nll_sum / tokens.clamp_min(1)).detach(), batch_size=batch_size)
        for name, value in components.items():
            if name != "lm":
                self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        return loss

    def _watch_loss(self, loss: torch.Tensor, components: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Queue this step's loss and components for the non-finite check; check when one is due.

        Due after :attr:`nonfinite_check_interval` queued steps, at the epoch's last batch and at the
        fit's last step (so no NaN reaches an end-of-epoch checkpoint), and at every step outside a
        Trainer.
        """
        values = torch.stack([loss.detach().float().reshape(())] + [
            torch.as_tensor(value).detach().float().reshape(()).to(loss.device) for value in components.values()
        ])
        trainer = self._trainer
        position = (trainer.global_step, self.current_epoch, batch_idx) if trainer is not None else (None, None, batch_idx)
        self._loss_window.append((position, tuple(components), values))
        due = (
            trainer is None
            or len(self._loss_window) >= self.nonfinite_check_interval
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or 0 < trainer.max_steps <= trainer.global_step + 1
        )
        if due:
            self.check_losses()

    def check_losses(self) -> None:
        """Raise :class:`NonFiniteLossError` for the first non-finite loss queued since the last check.

        One host-device synchronisation for the whole window.
        """
        window, self._loss_window = self._loss_window, []
        if not window:
            return
        finite = torch.isfinite(torch.stack([values[0] for _, _, values in window])).tolist()
        if all(finite):
            return
        (step, epoch, batch_idx), names, values = window[finite.index(False)]
        loss, *parts = values.tolist()
        details = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, parts))
        where = f"global step {step} (epoch {epoch}, batch {batch_idx})" if step is not None else f"batch {batch_idx}"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) in {self.experience_label} at {where}; components: {details}"
        )

    def on_train_start(self) -> None:
        self._loss_window = []  # what an interrupted earlier fit left unchecked is not this fit's

    def on_train_epoch_end(self) -> None:
        self.check_losses()

    def on_validation_start(self) -> None:
        # validation inside a fit (val_check_interval, an epoch cut short by limit_train_batches)
        # must not score weights a queued non-finite step already spoilt
        self.check_losses()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_losses()

    def on_train_end(self) -> None:
        self.check_losses()

    def configure_optimizers(self):
        parameters = self.trainable_parameters()
        if not parameters:
            raise ValueError(f"{self.experience_label}: the model has no trainable parameter (everything is frozen)")
        decay = [p for p in parameters if p.dim() >= 2]
        no_decay = [p for p in parameters if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for the whole update on a GPU; CPU keeps torch's default implementation
        fused = all(p.is_cuda for p in parameters)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas, fused=fused)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(self.lr_schedule, self.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation

    def on_validation_epoch_start(self) -> None:
        for metric in (self.eval_nll, self.eval_tokens, self.eval_correct, self.eval_examples, self.eval_choices,
                       self.eval_texts, self.eval_generated_correct, self.eval_generations):
            metric.reset()
        self._evaluating_classification = False
        self._shares_prompt = self.scores_on_shared_prompt()

    def scores_on_shared_prompt(self) -> bool:
        """Whether classification candidates are scored on one shared prompt run.

        Dynamic Meta-KV models too: the prompt's meta-state travels with the repeated cache.
        """
        return self.shared_prompt_scoring

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Accumulate the batch's scores; returns its mean NLL per label token (Avalanche's eval ``loss``)."""
        if "choice_input_ids" in batch:
            self._evaluating_classification = True
            if self.eval_context is not None:
                batch = self.eval_context(self.model, batch)
            choices = (batch["choice_input_ids"], batch["choice_labels"], batch["choice_attention_mask"])
            gold = batch["target"]
            if not self._shares_prompt:
                log_likelihoods, predictions = rank_choices(self.model, *choices, ranking=self.ranking)
                if self.exact_match:
                    generated_correct = generated_exact_match(self.model, *choices, gold)
            elif self.exact_match:  # the verdicts come from the ranking's own forward calls
                log_likelihoods, predictions, generated_correct = rank_choices_and_exact_match(
                    self.model, *choices, gold, ranking=self.ranking
                )
            else:
                log_likelihoods, predictions = rank_choices_with_shared_prompt(self.model, *choices, ranking=self.ranking)
            gold_ll = log_likelihoods.gather(1, gold[:, None]).squeeze(1)
            labels = batch["choice_labels"][torch.arange(gold.shape[0]), gold]
            self.eval_nll.update(-gold_ll.sum())
            self.eval_tokens.update((labels[:, 1:] != -100).sum())
            self.eval_correct.update((predictions == gold).sum())
            self.eval_examples.update(torch.tensor(float(gold.shape[0])))
            self.eval_choices.update(batch["index"], predicted=predictions, gold=gold)
            self._num_choices = log_likelihoods.shape[1]
            if self.exact_match:
                self.eval_generated_correct.update(generated_correct.sum())
                self.eval_generations.update(batch["index"], generated_correct=generated_correct)
            return -gold_ll.sum() / (labels[:, 1:] != -100).sum().clamp_min(1)
        else:
            if self.eval_scorer is not None:
                nll, count = sequence_nll(self.eval_scorer(self.model, batch), batch["labels"])
            elif self.block_compiler is not None:
                logits = self.batch_forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            use_cache=False).logits  # a cache per call: a new guard per layer
                nll, count = self.block_compiler.compiled(token_nll)(logits, batch["labels"])
            else:
                nll, count = sequence_nll(self(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
            self.eval_nll.update(nll.sum())
            self.eval_tokens.update(count.sum())
            self.eval_examples.update(torch.tensor(float(nll.shape[0])))
            self.eval_texts.update(batch["index"], nll=nll, tokens=count)
            return nll.sum() / count.sum().clamp_min(1)

    def on_validation_epoch_end(self) -> None:
        tokens = float(self.eval_tokens.compute())
        examples = float(self.eval_examples.compute())
        result = {"loss": float(self.eval_nll.compute()) / max(tokens, 1.0), "tokens": tokens, "examples": examples}
        if self._evaluating_classification:
            result["accuracy"] = float(self.eval_correct.compute()) / max(examples, 1.0)
            items = self.eval_choices.compute()
            self.eval_items = {"predicted": [int(v) for v in items["predicted"]],
                               "gold": [int(v) for v in items["gold"]], "num_choices": self._num_choices}
            if self.exact_match:
                result["exact_match"] = float(self.eval_generated_correct.compute()) / max(examples, 1.0)
                generated = self.eval_generations.compute()["generated_correct"]
                self.eval_items["generated_correct"] = [bool(v) for v in generated]
        else:
            items = self.eval_texts.compute()
            # 1e-4 nats per item keeps the lists short and moves a task's mean loss by less than that
            self.eval_items = {"nll": [round(v, 4) for v in items["nll"]], "tokens": [int(v) for v in items["tokens"]]}
        self.eval_result = result
        self.log("eval/loss", result["loss"])
        for name in ("accuracy", "exact_match"):
            if name in result:
                self.log(f"eval/{name}", result[name])


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token NLL and scored-token count, as :func:`sequence_nll`, in fixed shapes.

    Unscored positions are zeroed by ``ignore_index`` instead of left out by a boolean mask: a
    mask's data-dependent size makes the host wait for the device at every training step.

    Args:
        logits: ``[N, L, V]`` model outputs.
        labels: ``[N, L]`` token ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(nll_sum, token_count)``, both of shape ``[N]`` (float32 and int64).
    """
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1, :].flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(shift_labels.shape).sum(dim=-1), (shift_labels != IGNORE_INDEX).sum(dim=-1)


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier of each optimiser step: linear warm-up, then constant or decay.

    Not ``transformers.get_scheduler``, which would change results: its warm-up multiplier at
    step s is s / warmup (the first step trains at rate 0; ours is (s + 1) / warmup, full rate at
    the last warm-up step), and its linear decay rounds differently (one ulp at some steps). Its
    cosine decay after warm-up is ours exactly (``tests/training/test_module.py`` checks all three
    relations step by step).

    Args:
        kind: ``"constant"``, ``"linear"`` (to 0 at ``total``) or ``"cosine"`` (to 0 at ``total``).
        warmup: warm-up steps.
        total: optimiser steps of the fit.

    Returns:
        A function of the step index (from 0) for ``torch.optim.lr_scheduler.LambdaLR``.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor
