"""Experience replay with Avalanche storage policies.

The replay budget means the same thing for every replaying method of this package (this
plugin, and Meta-KV consolidation, which trains on its buffer): ``buffer_size`` is the total number of *training items*
kept from earlier experiences; after each experience the storage policy is updated with that
experience's own items (never with replayed ones). Policies:

* ``"experience_balanced"``: Avalanche's ``ExperienceBalancedBuffer`` (the budget split equally
  over the experiences seen so far, reservoir sampling inside each share);
* ``"reservoir"``: Avalanche's ``ReservoirSamplingBuffer`` (a uniform sample of everything seen).

While learning an experience, the replayed items are concatenated to its training data.
"""

from __future__ import annotations

from typing import Any, Literal

import metakv_cl  # noqa: F401  (torchvision import fix before avalanche loads)
from avalanche.benchmarks.utils.data import AvalancheDataset
from avalanche.training.storage_policy import ExemplarsBuffer, ExperienceBalancedBuffer, ReservoirSamplingBuffer

from metakv_cl.data.collate import PadCollator
from metakv_cl.data.stream import TokenizedItems, concat_experience_datasets
from metakv_cl.strategies.plugins.base import MethodPlugin

STORAGE_POLICIES = ("experience_balanced", "reservoir")


class ReplayMemory:
    """A replay buffer of training items managed by an Avalanche storage policy.

    Args:
        buffer_size: total number of items kept (0 disables replay).
        storage_policy: ``"experience_balanced"`` or ``"reservoir"``.
    """

    def __init__(self, buffer_size: int, storage_policy: str = "experience_balanced"):
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, got {buffer_size}")
        if storage_policy not in STORAGE_POLICIES:
            raise ValueError(f"unknown storage_policy {storage_policy!r}; choose one of {', '.join(STORAGE_POLICIES)}")
        self.buffer_size, self.storage_policy = buffer_size, storage_policy
        self.policy: ExemplarsBuffer = (
            ExperienceBalancedBuffer(max_size=buffer_size, adaptive_size=True)
            if storage_policy == "experience_balanced"
            else ReservoirSamplingBuffer(max_size=buffer_size)
        )

    def __len__(self) -> int:
        return len(self.policy.buffer) if self.buffer_size > 0 else 0

    @property
    def dataset(self):
        """The stored items (an ``AvalancheDataset``)."""
        return self.policy.buffer

    def update(self, strategy, experience) -> None:
        """Add ``experience``'s own items to the buffer (the policy decides what stays)."""
        if self.buffer_size > 0:
            self.policy.post_adapt(strategy, experience)

    def with_replay(self, dataset):
        """``dataset`` followed by the stored items (``dataset`` itself while the buffer is empty)."""
        return concat_experience_datasets([dataset, self.dataset]) if len(self) else dataset

    def _reservoirs(self) -> dict[int, ReservoirSamplingBuffer]:
        if isinstance(self.policy, ExperienceBalancedBuffer):
            return self.policy.buffer_groups
        return {0: self.policy}

    def state_dict(self) -> dict[str, Any]:
        """The stored items, their reservoir weights and sizes (tensors and plain values only)."""
        groups = []
        for key, reservoir in self._reservoirs().items():
            data = reservoir.buffer
            collate = getattr(data, "collate_fn", None)
            groups.append({
                "key": key,
                "max_size": reservoir.max_size,
                "weights": reservoir._buffer_weights,
                "items": [dict(data[index]) for index in range(len(data))],
                "pad_token_id": collate.pad_token_id if isinstance(collate, PadCollator) else None,
            })
        seen = self.policy._num_exps if isinstance(self.policy, ExperienceBalancedBuffer) else None
        return {"groups": groups, "experiences_seen": seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into this memory's policy."""
        reservoirs = {}
        for group in state["groups"]:
            reservoir = self.policy if not isinstance(self.policy, ExperienceBalancedBuffer) else (
                ReservoirSamplingBuffer(group["max_size"])
            )
            pad = group["pad_token_id"]
            reservoir.max_size = group["max_size"]
            reservoir._buffer_weights = group["weights"]
            reservoir.buffer = AvalancheDataset(
                [TokenizedItems(group["items"])], collate_fn=PadCollator(pad) if pad is not None else None
            )
            reservoirs[int(group["key"])] = reservoir
        if isinstance(self.policy, ExperienceBalancedBuffer):
            self.policy.buffer_groups = reservoirs
            self.policy._num_exps = int(state["experiences_seen"])


class Replay(MethodPlugin):
    """Experience replay: train on the new experience plus a buffer of earlier items.

    Args:
        buffer_size: replay budget in training items.
        storage_policy: ``"experience_balanced"`` or ``"reservoir"``.

    Raises:
        ValueError: a negative budget or an unknown policy.
    """

    exclusive = ("replay buffer",)

    def __init__(
        self,
        buffer_size: int = 64,
        storage_policy: Literal["experience_balanced", "reservoir"] = "experience_balanced",
    ):
        super().__init__()
        self.memory = ReplayMemory(buffer_size, storage_policy)

    @property
    def method_name(self) -> str:
        return "replay"

    def adapt_train_dataset(self, strategy, dataset):
        return self.memory.with_replay(dataset)

    def after_training_exp(self, strategy, **kwargs: Any) -> None:
        self.memory.update(strategy, strategy.experience)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
