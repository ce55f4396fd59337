"""Padding-free training batches: the documents of a mini-batch packed into fixed-length rows.

A padded batch costs ``batch x longest item`` tokens of compute; a packed one costs ``rows x
pack_length``, with padding only at the end of each row. Packing changes how a mini-batch is laid
out, never which documents form it (the sampler is untouched), so a packed run takes the same
optimisation steps as an unpacked one (same per-document losses, same token-mean loss, same
gradients up to float rounding), resumes the same way and gives DDP ranks the same disjoint shares.

Layout of a packed batch (``R`` rows of ``L = pack_length`` tokens)::

    input_ids      [R, L]  documents back to back, then ``pad_token_id`` to the end of the row
    labels         [R, L]  each item's labels; IGNORE_INDEX at every document's first token (the
                           last token of one document never predicts the next one's first token)
                           and on the row's padding
    position_ids   [R, L]  0, 1, 2, ... restarting at every document (and at the padding tail,
                           which so forms a segment of its own)
    attention_mask [R, L]  1 on document tokens, 0 on padding: it counts tokens only

No token is added between documents: the stream's items already end with the tokenizer's EOS
(``make_benchmark(append_eos=True)``, the default), and adding one would change the losses.

The model is called with ``position_ids``, *no* attention mask and ``use_cache=False``
(:func:`model_inputs`; a 2-D mask or a KV cache switches the detection off); transformers then
finds the documents from the restarting positions (``masking_utils.find_packed_sequence_indices``)
and builds a block-diagonal causal mask for sdpa and eager attention, so attention never crosses a
document (its flash-attention path reads the same positions as varlen boundaries; only sdpa and
eager are tested here). Meta-KV finds the same
documents: a consolidated meta-state is the same for every token, and a dynamic one (mean, max,
attentive, recurrent, hybrid) summarises each document alone (``PackedDocuments`` in
:mod:`metakv_cl.modeling.sources`), so both pack exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from metakv_cl.data.collate import IGNORE_INDEX

OPTION = "train_pack_length"


def assign_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Place documents into as few rows as first-fit decreasing finds (deterministic).

    Args:
        lengths: the length of each document.
        pack_length: tokens per row.

    Returns:
        For each row, the indices of its documents in the order they sit in the row.

    Raises:
        ValueError: a document longer than ``pack_length``.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    # longest first; ties by index, so the layout depends on the batch only
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > pack_length:
            raise ValueError(
                f"{OPTION}={pack_length} is shorter than a training item of {length} tokens; "
                f"set {OPTION} >= {length} (documents are never split)"
            )
        row = next((r for r, space in enumerate(free) if space >= length), None)
        if row is None:
            rows.append([])
            free.append(pack_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


def pack_items(
    items: Sequence[dict[str, torch.Tensor]], pack_length: int, pad_token_id: int = 0
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int]]]:
    """Pack tokenised items (``input_ids``, ``labels``: 1-D) into rows of ``pack_length`` tokens.

    Args:
        items: the items of one mini-batch.
        pack_length: tokens per row.
        pad_token_id: id written on the padding at the row ends (never attended to by a
            document, never scored).

    Returns:
        The packed batch (see the module docstring) and, for each item in the given order, its
        ``(row, start, length)`` in the batch.
    """
    if len(items) == 0:
        raise ValueError("cannot pack an empty list of items")
    lengths = [int(item["input_ids"].shape[-1]) for item in items]
    rows = assign_rows(lengths, pack_length)
    input_ids = torch.full((len(rows), pack_length), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), pack_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), pack_length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), pack_length), dtype=torch.long)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(items)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            end = start + lengths[index]
            input_ids[row, start:end] = items[index]["input_ids"]
            labels[row, start:end] = items[index]["labels"]
            labels[row, start] = IGNORE_INDEX
            position_ids[row, start:end] = torch.arange(lengths[index])
            attention_mask[row, start:end] = 1
            spans[index] = (row, start, lengths[index])
            start = end
        position_ids[row, start:] = torch.arange(pack_length - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}
    return batch, spans


class PackingCollator:
    """Collate language-modelling items into a packed batch (:func:`pack_items`).

    Args:
        pack_length: tokens per row (at least the longest item).
        pad_token_id: id written on the padding at the row ends.
    """

    def __init__(self, pack_length: int, pad_token_id: int = 0):
        check_pack_length(pack_length)
        self.pack_length, self.pad_token_id = int(pack_length), int(pad_token_id)

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pack_items(items, self.pack_length, self.pad_token_id)[0]

    def __repr__(self) -> str:
        return f"PackingCollator(pack_length={self.pack_length}, pad_token_id={self.pad_token_id})"


def check_pack_length(pack_length: int | None) -> None:
    """Refuse a ``train_pack_length`` that is not None or an integer >= 2."""
    if pack_length is None:
        return
    if isinstance(pack_length, bool) or not isinstance(pack_length, int) or pack_length < 2:
        raise ValueError(f"{OPTION} must be an integer >= 2 (tokens per packed row) or null, got {pack_length!r}")


def is_packed(batch: dict) -> bool:
    """Whether ``batch`` is packed: its documents are told apart by restarting ``position_ids``."""
    return "position_ids" in batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a training forward (of the model or of a teacher) on ``batch``.

    A packed batch passes its ``position_ids`` and no attention mask (its mask only marks the
    row-end padding, and a 2-D mask would stop transformers from separating the documents);
    no KV cache either way (a cache also stops it, and training needs none).
    """
    if is_packed(batch):
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def is_language_modelling(item: dict[str, torch.Tensor]) -> bool:
    """Whether a training item is a language-modelling document (its labels are its tokens).

    Classification training items score only their label string (IGNORE_INDEX on the prompt);
    they keep padded batches.
    """
    labels = item.get("labels")
    return labels is not None and torch.equal(labels, item["input_ids"])

