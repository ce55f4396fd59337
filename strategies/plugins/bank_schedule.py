"""Consolidation into the addressed bank: a group of slots per experience, old slots protected.

A Meta-KV model with ``source="addressed"`` reads, at every token, a mixture of the open slots of
a per-layer bank (:class:`~metakv_cl.modeling.sources.AddressedMemory`). :class:`BankSchedule`
gives each experience its own slots: before an experience it opens ``slots_per_experience``
new ones, and while that experience trains the bank (whatever fit trains the "memory" group,
e.g. :class:`~metakv_cl.strategies.plugins.metakv_consolidation.MetaKVConsolidation`'s
consolidation) the slots of earlier experiences are

* ``"frozen"``: the gradient of their keys and values is zero, so they stay bitwise as their
  experience left them;
* ``"regularised"``: pulled toward their values at the end of their experience by
  ``old_slots_weight`` x the squared L2 distance, summed over layers and slots;
* ``"trained"``: trained like the new ones.

The query that addresses the bank, the summary and the generator are trained as the owning fit
says. After each experience the plugin keeps which slots it opened and their keys and values
(:attr:`BankSchedule.experience_slots`, :attr:`BankSchedule.slot_snapshots`, saved with the
stream state for exact resume), and at each evaluation it records the routing: the mean read
weights per slot over each test experience's real tokens, per layer and averaged over layers
(``slot_read_weights`` in the report's ``extra``, drawn as a heatmap experience x slot).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from metakv_cl.modeling import SlotReadRecorder, get_meta_kv
from metakv_cl.strategies.plugins.base import MethodPlugin, PhaseFit, PluginConflictError
from metakv_cl.strategies.plugins.metakv_consolidation import MetaKVConsolidation
from metakv_cl.training.passes import all_reduce_sum

OLD_SLOT_POLICIES = ("frozen", "regularised", "trained")


class BankSchedule(MethodPlugin):
    """Opens slots of the addressed bank per experience and protects the slots of earlier experiences.

    Args:
        slots_per_experience: slots opened at each experience; after k experiences the first
            ``k * slots_per_experience`` slots of every layer's bank are open.
        old_slots: ``"frozen"``, ``"regularised"`` or ``"trained"`` (see the module docstring).
        old_slots_weight: weight of the pull of regularised old slots toward their values at
            the end of their experience (only used with ``old_slots="regularised"``).

    Raises:
        ValueError: a number out of range or an unknown policy; on attaching, a model whose
            source is not ``"addressed"``, a bank smaller than ``slots_per_experience``, frozen
            slots under AdamW weight decay, or a consolidation that does not train the bank;
            before an experience, a bank with no room for its slots.
    """

    exclusive = ("addressed bank",)

    def __init__(
        self,
        slots_per_experience: int = 4,
        old_slots: Literal["frozen", "regularised", "trained"] = "frozen",
        old_slots_weight: float = 1.0,
    ):
        if type(slots_per_experience) is not int or slots_per_experience < 1:  # bool is no count
            raise ValueError(f"slots_per_experience must be an integer >= 1, got {slots_per_experience!r}")
        if old_slots not in OLD_SLOT_POLICIES:
            raise ValueError(f"unknown old_slots {old_slots!r}; choose one of {', '.join(OLD_SLOT_POLICIES)}")
        if not 0 <= old_slots_weight < math.inf:  # also refuses NaN
            raise ValueError(f"old_slots_weight must be a finite number >= 0, got {old_slots_weight}")
        super().__init__()
        self.slots_per_experience = slots_per_experience
        self.old_slots, self.old_slots_weight = old_slots, old_slots_weight
        self.experience_slots: list[list[int]] = []
        self.slot_snapshots: list[dict[str, torch.Tensor]] = []
        self.read_weights: dict[int, torch.Tensor] = {}
        self._banks: list = []
        self._hooks: list = []
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, the old slots' consolidated values
        self._recorder: SlotReadRecorder | None = None

    @property
    def method_name(self) -> str:
        return f"slots{self.slots_per_experience}-{self.old_slots}"

    def attach(self, strategy) -> None:
        try:
            meta_kv = get_meta_kv(strategy.module.model)
        except ValueError:
            meta_kv = None
        if meta_kv is None or not meta_kv.config.uses_bank:
            source = "none (no Meta-KV)" if meta_kv is None else repr(meta_kv.config.source)
            raise ValueError(
                f"BankSchedule needs a Meta-KV model with source 'addressed' (model.meta_kv); its source is {source}"
            )
        capacity = meta_kv.config.memory_slots
        if self.slots_per_experience > capacity:
            raise ValueError(
                f"slots_per_experience={self.slots_per_experience} does not fit the bank's "
                f"meta_kv.memory_slots={capacity}"
            )
        if self.old_slots == "frozen" and strategy.module.weight_decay > 0:
            raise ValueError(
                f"old_slots='frozen' needs model.weight_decay 0 (got {strategy.module.weight_decay}): AdamW's decay "
                "would shrink the frozen slots; use old_slots='regularised' or drop the weight decay"
            )
        for index, plugin in enumerate(strategy.plugins):
            if isinstance(plugin, MetaKVConsolidation) and "memory" not in plugin.consolidate_groups:
                mine = strategy.plugins.index(self)
                first, second = sorted((index, mine))
                raise PluginConflictError(
                    f"plugins[{first}] {type(strategy.plugins[first]).__name__} and plugins[{second}] "
                    f"{type(strategy.plugins[second]).__name__} cannot be combined: consolidate_groups="
                    f"{list(plugin.consolidate_groups)} leaves the bank untrained; add 'memory'"
                )
        self._banks = [layer.bank for layer in meta_kv.layers]

    # ------------------------------------------------------------------ slots

    @property
    def open_slot_count(self) -> int:
        """Slots opened so far (by every experience started)."""
        return sum(len(slots) for slots in self.experience_slots)

    @property
    def old_slot_count(self) -> int:
        """Slots of the experiences finished before the current one."""
        return sum(len(slots) for slots in self.experience_slots[: len(self.slot_snapshots)])

    def before_training_exp(self, strategy, **kwargs: Any) -> None:
        if len(self.experience_slots) == len(self.slot_snapshots):  # a new experience (not a resumed one)
            start, count = self.open_slot_count, self.slots_per_experience
            capacity = self._banks[0].open.numel()
            if start + count > capacity:
                raise ValueError(
                    f"{strategy.experience_label()}: slots_per_experience={count} needs slots "
                    f"{start}..{start + count - 1} but the bank holds meta_kv.memory_slots={capacity}; "
                    f"raise memory_slots to at least {start + count} or lower slots_per_experience"
                )
            self.experience_slots.append(list(range(start, start + count)))
        for bank in self._banks:
            bank.open_slots(self.open_slot_count)

    def configure_fit(self, strategy, fit: PhaseFit) -> None:
        self._release()  # hooks left by a fit that raised before finish_fit
        old = self.old_slot_count
        trains_bank = any(bank.keys.requires_grad or bank.values.requires_grad for bank in self._banks)
        if old == 0 or not trains_bank:
            return
        if self.old_slots == "frozen":
            for bank in self._banks:
                for parameter in (bank.keys, bank.values):
                    if parameter.requires_grad:
                        self._hooks.append(parameter.register_hook(_zero_rows(old)))
        elif self.old_slots == "regularised":
            # the consolidated values, on the banks' device once per fit rather than at every step
            self._targets = [
                (torch.cat([snapshot["keys"][layer] for snapshot in self.slot_snapshots]).to(bank.keys.device),
                 torch.cat([snapshot["values"][layer] for snapshot in self.slot_snapshots]).to(bank.values.device))
                for layer, bank in enumerate(self._banks)
            ]
            strategy.module.penalties["old_slots"] = self.old_slots_penalty

    def finish_fit(self, strategy, fit: PhaseFit) -> None:
        self._release()
        self._targets = []
        strategy.module.penalties.pop("old_slots", None)

    def _release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def old_slots_penalty(self, module, batch: dict, outputs: Any) -> torch.Tensor:
        """``old_slots_weight`` x sum over layers and old slots of ||k - k*||^2 + ||v - v*||^2."""
        old = self.old_slot_count
        distance = sum(
            (bank.keys[:old] - keys).square().sum() + (bank.values[:old] - values).square().sum()
            for bank, (keys, values) in zip(self._banks, self._targets)
        )
        return self.old_slots_weight * distance

    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        slots = self.experience_slots[-1]
        self.slot_snapshots.append({
            "keys": torch.stack([bank.keys.detach()[slots].cpu().clone() for bank in self._banks]),
            "values": torch.stack([bank.values.detach()[slots].cpu().clone() for bank in self._banks]),
        })

    # ------------------------------------------------------------------ routing

    def before_eval_exp(self, strategy, **kwargs: Any) -> None:
        self._recorder = SlotReadRecorder(strategy.module.model).__enter__()

    def after_eval_exp(self, strategy, **kwargs: Any) -> None:
        recorder, self._recorder = self._recorder, None
        recorder.__exit__(None, None, None)
        device = self._banks[0].keys.device
        # every rank scored its share of the test items: the routing is over all of them
        totals = all_reduce_sum(torch.cat([recorder.sums.flatten(), torch.tensor([float(recorder.tokens)])]).to(device))
        recorder.sums, recorder.tokens = totals[:-1].view_as(recorder.sums).cpu(), int(totals[-1])
        self.read_weights[int(strategy.experience.current_experience)] = recorder.mean().float()

    def routing(self) -> dict[str, Any]:
        """The latest read weights of each evaluated experience.

        They average every real token the evaluation runs through the banks: a language-modelling
        test set's documents; for classification, the rows its scoring runs (the shared prompt and
        each candidate label, and the decoded tokens when exact match is on), so a prompt's tokens
        weigh as often as it is run.

        Returns:
            ``slot_read_weights`` (evaluated experiences x slots, the mean over layers; each row
            sums to 1), ``slot_read_weights_per_layer`` (layers x evaluated experiences x slots),
            ``slot_read_experiences`` (the index of each row's test experience) and
            ``slot_experience`` (for each slot, the training experience that opened it, or None),
            as plain lists.
        """
        experiences = sorted(self.read_weights)
        per_layer = torch.stack([self.read_weights[index] for index in experiences], dim=1)  # [layers, exps, slots]
        owner: list[int | None] = [None] * per_layer.shape[-1]
        for experience, slots in enumerate(self.experience_slots):
            for slot in slots:
                owner[slot] = experience
        return {
            "slot_read_weights": per_layer.mean(dim=0).tolist(),
            "slot_read_weights_per_layer": per_layer.tolist(),
            "slot_read_experiences": experiences,
            "slot_experience": owner,
        }

    def report_extra(self, strategy) -> dict[str, Any]:
        return self.routing() if self.read_weights else {}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"experience_slots": self.experience_slots, "slot_snapshots": self.slot_snapshots,
                "read_weights": dict(self.read_weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experience_slots = [list(slots) for slots in state["experience_slots"]]
        self.slot_snapshots = list(state["slot_snapshots"])  # the open slots come back with the model's weights
        self.read_weights = dict(state.get("read_weights", {}))  # the routing of evaluations before the restart


def _zero_rows(count: int):
    """A gradient hook that zeroes the gradient of the first ``count`` rows."""

    def hook(gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.clone()
        gradient[:count] = 0
        return gradient

    return hook
