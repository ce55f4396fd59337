"""The named methods of configs and reports, each a :class:`ContinualStrategy` with a fixed list
of method plugins.

A preset takes its method's options and the strategy's own (``train_mb_size``, ``name``, ...)
as keyword arguments, so a config names it by class path
(``class_path: metakv_cl.strategies.EWC``, ``init_args: {mode: online}``); ``plugins`` adds
more plugins after the preset's own. Every preset builds exactly this list:

===============================  ===========================================================
preset                           plugins
===============================  ===========================================================
``Naive``                        none
``EWC(...)``                     ``[plugins.EWC(...)]``
``LwF(...)``                     ``[plugins.LwF(...)]``
``LoRA(...)``                    ``[plugins.LoRA(...)]``
``OLoRA(...)``                   ``[plugins.OLoRA(...)]``
``KNNLM(...)``                   ``[plugins.KNNLM(...)]``
``RetrievedExamples(...)``       ``[plugins.RetrievedExamples(...)]``
``Replay(...)``                  ``[plugins.Replay(...)]``
``MetaKVConsolidation(...)``     ``[plugins.Replay(buffer_size, storage_policy),
                                 plugins.MetaKVConsolidation(...)]``, then
                                 ``plugins.Validated(validation_fraction, patience,
                                 phases=["consolidate"])`` when ``validation_fraction`` > 0
``MetaKVAddressed(...)``         the list of ``MetaKVConsolidation(...)``, then
                                 ``plugins.BankSchedule(slots_per_experience, old_slots,
                                 old_slots_weight)``
===============================  ===========================================================
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from avalanche.core import BasePlugin

from metakv_cl.strategies import plugins as methods
from metakv_cl.strategies.base import ContinualStrategy


def _put_first(method_plugins: list[BasePlugin], kwargs: dict[str, Any]) -> None:
    """Put the preset's plugins in the strategy arguments ``kwargs``, before any the caller gave.

    (Presets then call ``super().__init__(**kwargs)`` as written, which is how jsonargparse
    finds the strategy's own arguments of a preset.)
    """
    kwargs["plugins"] = [*method_plugins, *(kwargs.get("plugins") or [])]


class Naive(ContinualStrategy):
    """Sequential fine-tuning of the whole model with the plain language-modelling loss.

    Takes the arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "naive"


class EWC(ContinualStrategy):
    """Elastic Weight Consolidation: :class:`metakv_cl.strategies.plugins.EWC` on the strategy.

    Args:
        ewc_lambda, mode, decay_factor, fisher_batches: see :class:`metakv_cl.strategies.plugins.EWC`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "ewc"

    def __init__(
        self,
        *,
        ewc_lambda: float = 1e4,
        mode: Literal["separate", "online"] = "separate",
        decay_factor: float = 0.9,
        fisher_batches: int | None = None,
        **kwargs: Any,
    ):
        method = methods.EWC(ewc_lambda=ewc_lambda, mode=mode, decay_factor=decay_factor, fisher_batches=fisher_batches)
        _put_first([method], kwargs)
        super().__init__(**kwargs)


class LwF(ContinualStrategy):
    """Learning without Forgetting: :class:`metakv_cl.strategies.plugins.LwF` on the strategy.

    Args:
        alpha, temperature: see :class:`metakv_cl.strategies.plugins.LwF`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "lwf"

    def __init__(self, *, alpha: float = 1.0, temperature: float = 2.0, **kwargs: Any):
        _put_first([methods.LwF(alpha=alpha, temperature=temperature)], kwargs)
        super().__init__(**kwargs)


class LoRA(ContinualStrategy):
    """LoRA adapters: :class:`metakv_cl.strategies.plugins.LoRA` on the strategy.

    Args:
        mode, rank, alpha, dropout, target_modules, route_by_experience: see
            :class:`metakv_cl.strategies.plugins.LoRA`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "lora"

    def __init__(
        self,
        *,
        mode: Literal["shared", "per_experience"] = "shared",
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        route_by_experience: bool = False,
        **kwargs: Any,
    ):
        method = methods.LoRA(
            mode=mode, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules,
            route_by_experience=route_by_experience,
        )
        _put_first([method], kwargs)
        super().__init__(**kwargs)


class OLoRA(ContinualStrategy):
    """O-LoRA, orthogonal LoRA subspaces per experience: :class:`metakv_cl.strategies.plugins.OLoRA`
    on the strategy.

    Args:
        rank, alpha, dropout, target_modules, lambda_orth, lambda_l2: see
            :class:`metakv_cl.strategies.plugins.OLoRA`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "olora"

    def __init__(
        self,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        lambda_orth: float = 0.5,
        lambda_l2: float = 0.0,
        **kwargs: Any,
    ):
        method = methods.OLoRA(
            rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, lambda_orth=lambda_orth,
            lambda_l2=lambda_l2,
        )
        _put_first([method], kwargs)
        super().__init__(**kwargs)


class KNNLM(ContinualStrategy):
    """kNN-LM, each experience's training text added to a datastore: :class:`metakv_cl.strategies.plugins.KNNLM`
    on the strategy.

    Args:
        interpolation, temperature, k, freeze_base, index, window: see
            :class:`metakv_cl.strategies.plugins.KNNLM`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "knn-lm"

    def __init__(
        self,
        *,
        interpolation: float = 0.25,
        temperature: float = 1.0,
        k: int = 16,
        freeze_base: bool = False,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        window: int | None = None,
        **kwargs: Any,
    ):
        method = methods.KNNLM(
            interpolation=interpolation, temperature=temperature, k=k, freeze_base=freeze_base, index=index,
            window=window,
        )
        _put_first([method], kwargs)
        super().__init__(**kwargs)


class RetrievedExamples(ContinualStrategy):
    """Retrieval-augmented classification, each experience's labelled training items retrieved as
    in-context examples: :class:`metakv_cl.strategies.plugins.RetrievedExamples` on the strategy.

    Args:
        k, freeze_base, index, max_length, embed_batch_size: see
            :class:`metakv_cl.strategies.plugins.RetrievedExamples`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "retrieval-icl"

    def __init__(
        self,
        *,
        k: int = 4,
        freeze_base: bool = False,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        max_length: int | None = None,
        embed_batch_size: int = 32,
        **kwargs: Any,
    ):
        method = methods.RetrievedExamples(
            k=k, freeze_base=freeze_base, index=index, max_length=max_length, embed_batch_size=embed_batch_size
        )
        _put_first([method], kwargs)
        super().__init__(**kwargs)


class Replay(ContinualStrategy):
    """Experience replay: :class:`metakv_cl.strategies.plugins.Replay` on the strategy.

    Args:
        buffer_size, storage_policy: see :class:`metakv_cl.strategies.plugins.Replay`.
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "replay"

    def __init__(
        self,
        *,
        buffer_size: int = 64,
        storage_policy: Literal["experience_balanced", "reservoir"] = "experience_balanced",
        **kwargs: Any,
    ):
        _put_first([methods.Replay(buffer_size=buffer_size, storage_policy=storage_policy)], kwargs)
        super().__init__(**kwargs)


class MetaKVConsolidation(ContinualStrategy):
    """Meta-KV consolidation on a replay buffer, optionally validated.

    Args:
        mode, fast_weights, consolidate_groups, fast_rank, fast_alpha, fast_target_modules,
        fast_epochs, fast_lr, consolidation_epochs, consolidation_lr, temperature,
        lm_loss_weight: see :class:`metakv_cl.strategies.plugins.MetaKVConsolidation`.
        validation_fraction: if > 0, a :class:`metakv_cl.strategies.plugins.Validated` schedule
            on the consolidation fit with this share of its items held out.
        patience: the validated schedule's patience.
        buffer_size, storage_policy: the replay buffer (:class:`metakv_cl.strategies.plugins.Replay`).
        **kwargs: arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "metakv"
    uses_meta_kv = True

    def __init__(
        self,
        *,
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
        validation_fraction: float = 0.0,
        patience: int = 1,
        temperature: float = 1.0,
        lm_loss_weight: float = 1.0,
        buffer_size: int = 64,
        storage_policy: Literal["experience_balanced", "reservoir"] = "experience_balanced",
        **kwargs: Any,
    ):
        self.consolidation = methods.MetaKVConsolidation(
            mode=mode, fast_weights=fast_weights, consolidate_groups=consolidate_groups, fast_rank=fast_rank,
            fast_alpha=fast_alpha, fast_target_modules=fast_target_modules, fast_epochs=fast_epochs, fast_lr=fast_lr,
            consolidation_epochs=consolidation_epochs, consolidation_lr=consolidation_lr, temperature=temperature,
            lm_loss_weight=lm_loss_weight,
        )
        chosen = [methods.Replay(buffer_size=buffer_size, storage_policy=storage_policy), self.consolidation]
        if validation_fraction != 0:
            chosen.append(methods.Validated(validation_fraction, patience, phases=["consolidate"]))
        _put_first(chosen, kwargs)
        super().__init__(**kwargs)

    def default_method_name(self) -> str:
        return self.consolidation.method_name  # its buffer and schedule are part of the method


class MetaKVAddressed(MetaKVConsolidation):
    """Meta-KV consolidation into the addressed bank: new slots per experience, old slots protected.

    The model needs ``meta_kv: {source: addressed, memory_slots: ...}`` with room for
    ``slots_per_experience`` slots per experience of the stream.

    Args:
        slots_per_experience, old_slots, old_slots_weight: see
            :class:`metakv_cl.strategies.plugins.BankSchedule`.
        **kwargs: arguments of :class:`MetaKVConsolidation` (the consolidation, its replay
            buffer and validation) and of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "metakv-addressed"

    def __init__(
        self,
        *,
        slots_per_experience: int = 4,
        old_slots: Literal["frozen", "regularised", "trained"] = "frozen",
        old_slots_weight: float = 1.0,
        **kwargs: Any,
    ):
        self.bank_schedule = methods.BankSchedule(
            slots_per_experience=slots_per_experience, old_slots=old_slots, old_slots_weight=old_slots_weight,
        )
        _put_first([self.bank_schedule], kwargs)  # MetaKVConsolidation puts its own plugins before it
        super().__init__(**kwargs)

    def default_method_name(self) -> str:
        return f"{self.consolidation.method_name}+{self.bank_schedule.method_name}"
