"""Batching of tokenised stream items (dicts of tensors) into padded mini-batches.

Two item layouts come out of :func:`metakv_cl.data.stream.make_benchmark`:

* language-modelling and classification *training* items: ``input_ids`` and ``labels``
  (1-D, ``-100`` where no loss is taken), plus the scalar ``experience``;
* classification *test* items: ``choice_input_ids`` and ``choice_labels`` (``[C, L]``: one row
  per candidate label string), the scalar ``target`` (index of the gold label) and ``experience``.

:class:`PadCollator` pads every sequence key on the right to the longest sequence in the batch
and adds the matching attention mask, so both layouts go through the same collator. Its batches
are :class:`TokenBatch` dicts, which Avalanche code that unpacks ``(x, y, task)`` batches can read.
Other scalar keys are stacked: evaluation batches carry ``index`` (``[B]``, int64), each item's
position in the test set, because evaluation loaders order items by length
(:class:`metakv_cl.training.datamodule.EvaluationDataModule`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

IGNORE_INDEX = -100

# key -> the key of its attention mask; padded with the pad token id. The mask is built from the
# sequence lengths unless the item carries it (items that pad internally, like choice rows).
_TOKEN_KEYS = {"input_ids": "attention_mask", "choice_input_ids": "choice_attention_mask"}
_MASK_KEYS = frozenset(_TOKEN_KEYS.values())
# keys padded with IGNORE_INDEX (no loss on padding).
_LABEL_KEYS = ("labels", "choice_labels")


def sequence_length(item: Mapping[str, torch.Tensor]) -> int:
    """The length an item is padded to in a batch: the last dimension of its token ids
    (``input_ids``, or ``choice_input_ids`` of a classification test item)."""
    key = "input_ids" if "input_ids" in item else "choice_input_ids"
    return int(item[key].shape[-1])


def positional(batch: Mapping[str, torch.Tensor], position: int) -> torch.Tensor:
    """Avalanche's positional view of a batch dict, whose plugins read a batch as ``(x, y, ..., t)``.

    Args:
        batch: a collated (padded or packed) batch.
        position: 0 for the token ids (``input_ids``, or ``choice_input_ids`` of a classification
            test batch), 1 for the targets (``labels``, or ``target``), -1 for the task labels:
            all 0 (the model is single-headed and gets no task identity).

    Raises:
        IndexError: another position.
    """
    x = batch["input_ids"] if "input_ids" in batch else batch["choice_input_ids"]
    if position == 0:
        return x
    if position == 1:
        return batch["labels"] if "labels" in batch else batch["target"]
    if position == -1:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    raise IndexError(f"a batch has positions 0 (x), 1 (y) and -1 (task labels), not {position}")


class TokenBatch(dict):
    """A batch dict whose integer positions are :func:`positional`'s view (string keys work as in
    any dict), so Avalanche code that unpacks ``batch[0], batch[1], batch[-1]`` reads it."""

    def __getitem__(self, key):
        return positional(self, key) if isinstance(key, int) else super().__getitem__(key)


class PadCollator:
    """Collate a list of item dicts into one batch dict, right-padding sequences.

    Args:
        pad_token_id: id written into padded ``input_ids`` positions (masked out anyway).
    """

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> TokenBatch:
        if len(items) == 0:
            raise ValueError("cannot collate an empty list of items")
        keys = items[0].keys()
        batch = TokenBatch()
        for key in keys:
            values = [item[key] for item in items]
            if key in _TOKEN_KEYS:
                batch[key] = _pad_last_dim(values, self.pad_token_id)
                if _TOKEN_KEYS[key] not in keys:
                    batch[_TOKEN_KEYS[key]] = _pad_last_dim([torch.ones_like(v) for v in values], 0)
            elif key in _MASK_KEYS:
                batch[key] = _pad_last_dim(values, 0)
            elif key in _LABEL_KEYS:
                batch[key] = _pad_last_dim(values, IGNORE_INDEX)
            else:
                batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        return batch

    def __repr__(self) -> str:
        return f"PadCollator(pad_token_id={self.pad_token_id})"


def _pad_last_dim(tensors: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Stack tensors that differ only in their last dimension, right-padding it with ``value``."""
    length = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-1], length), value)
    for row, tensor in enumerate(tensors):
        if tensor.shape[:-1] != tensors[0].shape[:-1]:
            raise ValueError(f"items disagree on leading dimensions: {tuple(tensor.shape)} vs {tuple(tensors[0].shape)}")
        out[row, ..., : tensor.shape[-1]] = tensor
    return out
