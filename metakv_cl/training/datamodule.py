"""Data loading for one Lightning fit or validation: DDP-aware, deterministic, resumable."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from metakv_cl.data.collate import sequence_length
from metakv_cl.training.bucketing import TokenBudgetBatchSampler, check_token_budget
from metakv_cl.training.packing import OPTION, PackingCollator, check_pack_length, is_language_modelling


class _ExperienceLoaders(pl.LightningDataModule):
    """Shared loader construction: the dataset's own ``collate_fn``, this rank's share."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers

    def world(self) -> tuple[int, int]:
        """(world size, rank) of the attached Trainer ((1, 0) before one is attached)."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def collate_fn(self):
        return getattr(self.dataset, "collate_fn", None)

    def loader(self, items: Dataset, **sampling: Sampler) -> DataLoader:
        """A DataLoader of ``items`` (the dataset or a view of it) that batches with the dataset's collate.

        Args:
            items: what the sampler's indices index.
            **sampling: ``sampler=`` (mini-batches of ``batch_size`` items in its order) or
                ``batch_sampler=`` (the batches it yields).
        """
        return DataLoader(
            items,
            batch_size=self.batch_size if "sampler" in sampling else 1,
            **sampling,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class TrainingDataModule(_ExperienceLoaders):
    """Shuffled training batches of one (adapted) experience dataset.

    Shuffling uses a ``DistributedSampler`` seeded by ``seed`` even on one process: the order of
    epoch e depends only on (seed, e), so a fit resumed from an end-of-epoch checkpoint sees the
    same batches as an uninterrupted one, and DDP ranks take disjoint shares of one permutation.

    With ``pack_length`` the documents of each mini-batch of a language-modelling dataset are
    packed into rows of that many tokens (:mod:`metakv_cl.training.packing`): the same documents
    per step, so the same losses and gradients, without the padding. A dataset of classification
    items (labels on the answer only) keeps padded batches.

    With ``token_budget`` padded batches (classification items, or language-modelling ones when
    not packed) group items of similar length, as many as fit ``items x longest <= token_budget``
    (:mod:`metakv_cl.training.bucketing`, same determinism in (seed, epoch); ``batch_size`` does
    not apply to them).

    Args:
        dataset: the items (an ``AvalancheDataset``: its ``collate_fn`` batches them).
        batch_size: mini-batch size (documents) per process.
        seed: shuffling seed.
        num_workers: DataLoader workers.
        pack_length: tokens per packed row, at least the longest item; None: padded batches.
        token_budget: most padded tokens per batch of padded items; None: ``batch_size`` items per batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        pack_length: int | None = None,
        token_budget: int | None = None,
    ):
        super().__init__(dataset, batch_size, num_workers)
        check_pack_length(pack_length)
        check_token_budget(token_budget)
        self.seed = seed
        self.pack_length = pack_length if pack_length is not None and is_language_modelling(dataset[0]) else None
        self.token_budget = token_budget if self.pack_length is None else None

    def setup(self, stage: str) -> None:
        if self.pack_length is None:
            return
        longest = max(int(self.dataset[i]["input_ids"].shape[-1]) for i in range(len(self.dataset)))
        if longest > self.pack_length:
            raise ValueError(
                f"{OPTION}={self.pack_length} is shorter than the longest training item ({longest} tokens); "
                f"set {OPTION} >= {longest} (documents are never split; rows may exceed the model's positions)"
            )

    def collate_fn(self):
        padded = super().collate_fn()
        if self.pack_length is None:
            return padded
        return PackingCollator(self.pack_length, getattr(padded, "pad_token_id", 0))

    def train_dataloader(self) -> DataLoader:
        world, rank = self.world()
        if self.token_budget is None:
            sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
            return self.loader(self.dataset, sampler=sampler)
        lengths = [sequence_length(self.dataset[i]) for i in range(len(self.dataset))]
        batches = TokenBudgetBatchSampler(lengths, self.token_budget, num_replicas=world, rank=rank, seed=self.seed)
        return self.loader(self.dataset, batch_sampler=batches)


class ValidatedTrainingDataModule(TrainingDataModule):
    """Training batches plus in-order validation batches of held-out items (model selection in a fit).

    Args:
        dataset: the training items.
        validation: the held-out items (always padded batches, as :class:`EvaluationDataModule`'s).
        batch_size, seed, num_workers, pack_length, token_budget: as :class:`TrainingDataModule`.
    """

    def __init__(
        self,
        dataset: Dataset,
        validation: Dataset,
        *,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        pack_length: int | None = None,
        token_budget: int | None = None,
    ):
        super().__init__(
            dataset, batch_size=batch_size, seed=seed, num_workers=num_workers, pack_length=pack_length,
            token_budget=token_budget,
        )
        self.validation = EvaluationDataModule(validation, batch_size=batch_size, num_workers=num_workers)

    def val_dataloader(self) -> DataLoader:
        self.validation.trainer = self.trainer
        return self.validation.val_dataloader()


class LengthOrderedItems(Dataset):
    """The items of ``dataset`` longest first (ties in dataset order), each with its position in
    ``dataset`` added under ``index`` (a 0-d int64 tensor).

    Args:
        dataset: the items (dicts of tensors).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        lengths = [sequence_length(dataset[i]) for i in range(len(dataset))]
        self.order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        index = self.order[position]
        return {**self.dataset[index], "index": torch.tensor(index)}


class EvaluationDataModule(_ExperienceLoaders):
    """In-order evaluation batches; under DDP each rank scores a disjoint share (no repeats),
    so the summed metrics of all ranks equal a single process's.

    The order is by length, longest first (:class:`LengthOrderedItems`): each batch is padded to
    its longest item, so batches of items of similar length waste little on padding, and a batch
    that does not fit in memory fails at once. The sums that evaluation reports do not depend on
    the order (up to float rounding); each batch's ``index`` (``[B]``) gives its items' positions
    in ``dataset``, to put per-item outcomes back in test-set order.

    Args:
        dataset: the test items.
        batch_size: mini-batch size per process.
        num_workers: DataLoader workers.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int = 16, num_workers: int = 0):
        super().__init__(dataset, batch_size, num_workers)
        self.by_length = LengthOrderedItems(dataset)

    def val_dataloader(self) -> DataLoader:
        world, rank = self.world()
        items = self.by_length
        if world > 1:
            sampler = UnrepeatedDistributedSampler(items, num_replicas=world, rank=rank, shuffle=False)
        else:
            sampler = SequentialSampler(items)
        return self.loader(items, sampler=sampler)


class GivenTrainingLoader(pl.LightningDataModule):
    """Training batches from a loader a plugin built (Avalanche's ``ReplayPlugin`` sets
    ``strategy.dataloader`` to its ``ReplayDataLoader``), used as it is.

    Args:
        loader: any iterable of collated batches with a length.

    Raises:
        ValueError: (when the fit starts) under DDP: the loader is not split across processes.
    """

    def __init__(self, loader):
        super().__init__()
        self.given = loader

    def train_dataloader(self):
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ValueError(
                f"a plugin replaced strategy.dataloader with {type(self.given).__name__}, which is not split across "
                f"the {self.trainer.world_size} DDP processes; run such plugins on one process"
            )
        return self.given
