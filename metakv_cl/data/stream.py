"""Task streams as Avalanche benchmarks of tokenised language data.

:func:`make_benchmark` turns a list of :class:`~metakv_cl.data.tasks.TextTask` /
:class:`~metakv_cl.data.tasks.ClassificationTask` into an Avalanche benchmark
(``benchmark_from_datasets``: ``benchmark.train_stream`` / ``benchmark.test_stream``, one
experience per task, each ``experience.dataset`` an ``AvalancheDataset`` of dicts of tensors
that batches with its own ``collate_fn``)::

    from metakv_cl.data import TextTask, make_benchmark
    from metakv_cl.hub import load_tokenizer

    tasks = [TextTask("cooking", train=[...], test=[...]), TextTask("sailing", ...)]
    benchmark = make_benchmark(tasks, load_tokenizer("gpt2"), max_length=128, overflow="chunk")
    for experience in benchmark.train_stream:
        print(experience.current_experience, len(experience.dataset))

Item layouts:

* language modelling (train and test): ``input_ids``, ``labels`` (= ``input_ids``), ``experience``;
* classification, train: the prompt, a space and the label string (then end-of-text), with the
  loss on the label tokens only;
* classification, test: one row per candidate label (``choice_input_ids``, ``choice_labels``)
  and the gold ``target`` index; the prediction is the most likely label string.

Texts longer than ``max_length`` tokens (the model's position limit) follow ``overflow``:
``"truncate"`` keeps the first ``max_length`` tokens, ``"chunk"`` splits a text into consecutive
windows of ``max_length`` tokens, ``"error"`` raises a ``ValueError`` naming the experience, the
text and its length. A classification prompt cannot be split without losing its answer, so
under both ``"truncate"`` and ``"chunk"`` it loses its *first* tokens (the answer cue at the end
of the template is kept).

The module also reads task lists from text files and Hugging Face datasets
(:func:`text_task_from_files`, :func:`text_task_from_hf_dataset`,
:func:`classification_task_from_hf_dataset`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch.utils.data import Dataset

import metakv_cl  # noqa: F401  (torchvision import fix before avalanche loads)
import pytorch_lightning as pl
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.utils.data import AvalancheDataset

from metakv_cl.data.collate import IGNORE_INDEX, PadCollator
from metakv_cl.data.registry import get_loader
from metakv_cl.data.tasks import ClassificationTask, Task, TextTask
from metakv_cl.files import read_text

OVERFLOW_POLICIES = ("truncate", "chunk", "error")
SCORE_NAMES = {"lm": "loss", "classification": "accuracy"}


@dataclass(frozen=True)
class ExperienceInfo:
    """What the engine needs to know about one experience besides its data.

    Args:
        index: position in its stream (0-based).
        name: the task name.
        kind: ``"lm"`` or ``"classification"``.
        labels: candidate label strings (classification only).
        num_train_items: tokenised training items (after chunking).
        num_test_items: tokenised test items.
    """

    index: int
    name: str
    kind: str
    labels: tuple[str, ...] = ()
    num_train_items: int = 0
    num_test_items: int = 0

    @property
    def score_name(self) -> str:
        """``"loss"`` for language modelling (lower is better), ``"accuracy"`` for classification."""
        return SCORE_NAMES[self.kind]


class LMBenchmark(CLScenario):
    """An Avalanche benchmark of tokenised language tasks plus the metadata the engine uses.

    Streams: ``train_stream`` and ``test_stream`` (one experience per task) and, when warm-up
    tasks were given, ``warmup_stream`` (their training data, for pre-training before the
    continual stream; never evaluated).

    Attributes:
        experience_infos: one :class:`ExperienceInfo` per experience of the train/test streams.
        warmup_infos: the same for the warm-up stream.
        score_name: ``"loss"`` or ``"accuracy"`` (every experience of a stream has the same kind).
        max_length: the token limit items were cut to.
        overflow: the policy that was applied.
        pad_token_id: the id used to pad batches.
    """

    def __init__(
        self,
        streams,
        *,
        experience_infos: Sequence[ExperienceInfo],
        warmup_infos: Sequence[ExperienceInfo],
        max_length: int,
        overflow: str,
        pad_token_id: int,
    ):
        super().__init__(streams)
        self.experience_infos = list(experience_infos)
        self.warmup_infos = list(warmup_infos)
        self.score_name = self.experience_infos[0].score_name
        self.max_length = max_length
        self.overflow = overflow
        self.pad_token_id = pad_token_id

    @property
    def experience_names(self) -> list[str]:
        """Task names of the train/test streams, in order."""
        return [info.name for info in self.experience_infos]

    @property
    def num_experiences(self) -> int:
        return len(self.experience_infos)

    def fingerprint(self) -> str:
        """A short hash of the stream's shape (names, kinds, item counts, token limit).

        Resuming a run checks it, so a changed stream config is refused instead of mixing runs.
        """
        def shape(infos: list[ExperienceInfo]) -> list:
            return [[i.name, i.kind, list(i.labels), i.num_train_items, i.num_test_items] for i in infos]

        payload = json.dumps(
            {
                "warmup": shape(self.warmup_infos),
                "experiences": shape(self.experience_infos),
                "max_length": self.max_length,
                "overflow": self.overflow,
            }
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


class TokenizedItems(Dataset):
    """A list of tokenised items; each access returns a fresh dict (Avalanche may add keys to it)."""

    def __init__(self, items: Sequence[dict[str, torch.Tensor]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.items[index])


def is_classification_item(item: Mapping[str, torch.Tensor]) -> bool:
    """Whether a stream item is a classification item: a test item with candidate rows, or a
    training item whose labels mask its prompt (language-modelling items score every token)."""
    return "choice_input_ids" in item or bool((item["labels"] == IGNORE_INDEX).any())


def make_benchmark(
    tasks: Sequence[Task],
    tokenizer,
    max_length: int = 128,
    overflow: str = "chunk",
    *,
    append_eos: bool = True,
    warmup_tasks: Sequence[Task] = (),
) -> LMBenchmark:
    """Tokenise a task list into an Avalanche benchmark.

    Args:
        tasks: the continual stream, one experience per task; all of one kind (language
            modelling or classification), so that one score describes the stream.
        tokenizer: a Hugging Face tokenizer (its EOS token ends every text; its pad token pads).
        max_length: token limit per item; use the model's number of positions (or less).
        overflow: ``"truncate"``, ``"chunk"`` or ``"error"`` (see the module docstring).
        append_eos: end every text (and every label string) with the EOS token.
        warmup_tasks: tasks whose training data forms ``benchmark.warmup_stream``.

    Returns:
        The :class:`LMBenchmark`.

    Raises:
        ValueError: no tasks, mixed task kinds, unknown overflow policy, an experience without
            any usable item, or (with ``overflow="error"``) a text longer than ``max_length``.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("make_benchmark: the task list is empty (a stream needs at least one experience)")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"unknown overflow policy {overflow!r}; choose one of {', '.join(OVERFLOW_POLICIES)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    kinds = {task.kind for task in tasks}
    if len(kinds) > 1:
        raise ValueError(
            f"a stream mixes task kinds {sorted(kinds)}; use only language-modelling or only classification tasks"
        )
    encoder = _Encoder(tokenizer, max_length=max_length, overflow=overflow, append_eos=append_eos)
    train_sets, test_sets, infos = [], [], []
    for index, task in enumerate(tasks):
        train_items, test_items, info = encoder.encode_task(task, index, stream="")
        train_sets.append(_as_dataset(train_items, encoder.collator))
        test_sets.append(_as_dataset(test_items, encoder.collator))
        infos.append(info)
    streams: dict[str, list[AvalancheDataset]] = {"train": train_sets, "test": test_sets}
    warmup_infos = []
    if warmup_tasks:
        warmup_sets = []
        for index, task in enumerate(warmup_tasks):
            train_items, _, info = encoder.encode_task(task, index, stream="warm-up ")
            warmup_sets.append(_as_dataset(train_items, encoder.collator))
            warmup_infos.append(info)
        streams["warmup"] = warmup_sets
    scenario = benchmark_from_datasets(**streams)
    return LMBenchmark(
        scenario.streams.values(),
        experience_infos=infos,
        warmup_infos=warmup_infos,
        max_length=max_length,
        overflow=overflow,
        pad_token_id=encoder.pad_token_id,
    )


def _as_dataset(items: list[dict[str, torch.Tensor]], collator: PadCollator) -> AvalancheDataset:
    return AvalancheDataset([TokenizedItems(items)], collate_fn=collator)


@dataclass
class _Encoder:
    """Tokenises tasks into items under one overflow policy."""

    tokenizer: Any
    max_length: int
    overflow: str
    append_eos: bool
    pad_token_id: int = field(init=False)
    eos: list[int] = field(init=False)

    def __post_init__(self) -> None:
        eos_id = self.tokenizer.eos_token_id
        if self.append_eos and eos_id is None:
            raise ValueError("append_eos=True needs a tokenizer with an EOS token")
        pad_id = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0))
        self.eos = [int(eos_id)] if self.append_eos else []
        self.collator = PadCollator(self.pad_token_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode_task(self, task: Task, index: int, stream: str):
        where = f"{stream}experience {index} ({task.name!r})"
        if isinstance(task, TextTask):
            train = self._lm_items(task.train, index, where, "train")
            test = self._lm_items(task.test, index, where, "test")
            labels: tuple[str, ...] = ()
        elif isinstance(task, ClassificationTask):
            train, test = self._classification_items(task, index, where)
            labels = tuple(task.labels)
        else:
            raise TypeError(f"{where}: expected a TextTask or ClassificationTask, got {type(task).__name__}")
        for split, items in (("train", train), ("test", test)):
            if not items:
                raise ValueError(f"{where}: the {split} split has no text with at least 2 tokens (empty experience)")
        info = ExperienceInfo(index, task.name, task.kind, labels, len(train), len(test))
        return train, test, info

    def _lm_items(self, texts: Sequence[str], index: int, where: str, split: str) -> list[dict[str, torch.Tensor]]:
        items = []
        experience = torch.tensor(index)
        for text_index, ids in enumerate(self.encode(texts)):
            ids = ids + self.eos
            for window in self._fit(ids, where, split, text_index):
                if len(window) >= 2:  # a single token has nothing to predict
                    tensor = torch.tensor(window, dtype=torch.long)
                    items.append({"input_ids": tensor, "labels": tensor.clone(), "experience": experience})
        return items

    def _fit(self, ids: list[int], where: str, split: str, text_index: int) -> list[list[int]]:
        """Apply the overflow policy to one tokenised text."""
        if len(ids) <= self.max_length:
            return [ids]
        if self.overflow == "error":
            raise self._overflow_error(where, split, text_index, len(ids))
        if self.overflow == "truncate":
            return [ids[: self.max_length]]
        return [ids[start : start + self.max_length] for start in range(0, len(ids), self.max_length)]

    def _overflow_error(self, where: str, split: str, text_index: int, length: int) -> ValueError:
        return ValueError(
            f"{where}: {split} text {text_index} has {length} tokens, more than the limit of "
            f"{self.max_length} (max_length, the model's positions); set overflow='truncate' or 'chunk'"
        )

    def _classification_items(self, task: ClassificationTask, index: int, where: str):
        label_ids = [ids + self.eos for ids in self.encode([" " + label for label in task.labels])]
        label_index = {label: i for i, label in enumerate(task.labels)}
        prompt_budget = self.max_length - max(len(ids) for ids in label_ids)
        if prompt_budget < 1:
            raise ValueError(
                f"{where}: the longest label string takes {max(len(i) for i in label_ids)} tokens, "
                f"which leaves no room for the prompt within max_length={self.max_length}"
            )
        experience = torch.tensor(index)

        def prompts(split: str, pairs) -> list[list[int]]:
            encoded = self.encode([task.prompt(text) for text, _ in pairs])
            fitted = []
            for text_index, ids in enumerate(encoded):
                if len(ids) > prompt_budget:
                    if self.overflow == "error":
                        longest = len(ids) + max(len(i) for i in label_ids)
                        raise self._overflow_error(where, split, text_index, longest)
                    ids = ids[len(ids) - prompt_budget :]  # keep the answer cue at the end
                fitted.append(ids)
            return fitted

        train = []
        for ids, (_, label) in zip(prompts("train", task.train), task.train):
            target = label_ids[label_index[label]]
            input_ids = torch.tensor(ids + target, dtype=torch.long)
            labels = torch.tensor([IGNORE_INDEX] * len(ids) + target, dtype=torch.long)
            train.append({"input_ids": input_ids, "labels": labels, "experience": experience})
        test = []
        for ids, (_, label) in zip(prompts("test", task.test), task.test):
            rows = [ids + candidate for candidate in label_ids]
            width = max(len(row) for row in rows)
            choice_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            choice_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            choice_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (sequence, candidate) in enumerate(zip(rows, label_ids)):
                choice_ids[row, : len(sequence)] = torch.tensor(sequence)
                choice_labels[row, len(ids) : len(sequence)] = torch.tensor(candidate)
                choice_mask[row, : len(sequence)] = 1
            # rows of one item differ in length, so the item carries its own attention mask
            test.append(
                {
                    "choice_input_ids": choice_ids,
                    "choice_labels": choice_labels,
                    "choice_attention_mask": choice_mask,
                    "target": torch.tensor(label_index[label]),
                    "experience": experience,
                }
            )
        return train, test


# --------------------------------------------------------------------------- task sources


def text_task_from_files(
    name: str, train_path: str | Path, test_path: str | Path, unit: str = "line", encoding: str = "utf-8"
) -> TextTask:
    """A language-modelling task from two text files.

    Args:
        name: the task name.
        train_path: training text file.
        test_path: held-out text file.
        unit: ``"line"`` (one text per non-empty line) or ``"paragraph"`` (texts separated by
            blank lines).
        encoding: file encoding.

    Returns:
        The :class:`TextTask`.

    Raises:
        FileNotFoundError: a file is missing. ValueError: unknown unit, or a file with no text.
    """
    if unit not in ("line", "paragraph"):
        raise ValueError(f"unknown unit {unit!r}; choose 'line' or 'paragraph'")

    def read(path: str | Path) -> list[str]:
        content = read_text(path, f"task {name!r}: text file", encoding)
        pieces = content.splitlines() if unit == "line" else content.split("\n\n")
        return [piece.strip() for piece in pieces if piece.strip()]

    return TextTask(name, train=read(train_path), test=read(test_path))


def _hf_splits(dataset: Any, train_split: str, test_split: str) -> tuple[Sequence[Mapping], Sequence[Mapping]]:
    """Return (train rows, test rows) from a dataset name, a DatasetDict or a mapping of row lists."""
    if isinstance(dataset, str):
        try:
            import datasets  # optional dependency
        except ImportError:
            raise ImportError(
                f"loading the Hugging Face dataset {dataset!r} by name needs the `datasets` package; "
                "pass the loaded dataset (or a dict of row lists) instead"
            ) from None
        dataset = datasets.load_dataset(dataset)
    missing = [split for split in (train_split, test_split) if split not in dataset]
    if missing:
        raise KeyError(f"dataset has no split(s) {missing}; available: {list(dataset.keys())}")
    return dataset[train_split], dataset[test_split]


def _column(rows: Sequence[Mapping], column: str, limit: int | None) -> list:
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if hasattr(rows, "select") else rows[:limit]
    values = []
    for row in rows:
        if column not in row:
            raise KeyError(f"dataset rows have no column {column!r}; columns: {sorted(row.keys())}")
        values.append(row[column])
    return values


def text_task_from_hf_dataset(
    name: str,
    dataset: Any,
    text_column: str = "text",
    train_split: str = "train",
    test_split: str = "test",
    max_items: int | None = None,
) -> TextTask:
    """A language-modelling task from a Hugging Face dataset.

    Args:
        name: the task name.
        dataset: a dataset name (needs the ``datasets`` package), a ``DatasetDict``, or any
            mapping ``split -> sequence of row dicts``.
        text_column: the column holding the text.
        train_split: split used for training.
        test_split: split used for evaluation.
        max_items: keep at most this many rows per split.

    Returns:
        The :class:`TextTask` (empty texts dropped).
    """
    train_rows, test_rows = _hf_splits(dataset, train_split, test_split)
    train = [t for t in _strings(_column(train_rows, text_column, max_items), text_column, train_split) if t.strip()]
    test = [t for t in _strings(_column(test_rows, text_column, max_items), text_column, test_split) if t.strip()]
    return TextTask(name, train=train, test=test)


def _strings(values: list, column: str, split: str) -> list[str]:
    """``values`` when all are strings; str() would turn a missing value into the text "None"."""
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(
                f"split {split!r}, row {row}: column {column!r} holds {type(value).__name__} {value!r:.40}, not a string"
            )
    return values


def classification_task_from_hf_dataset(
    name: str,
    dataset: Any,
    text_column: str,
    label_column: str,
    label_names: Sequence[str] | None = None,
    template: str = "{text}\nAnswer:",
    train_split: str = "train",
    test_split: str = "test",
    max_items: int | None = None,
) -> ClassificationTask:
    """A classification task from a Hugging Face dataset.

    Args:
        name: the task name.
        dataset: as in :func:`text_task_from_hf_dataset`.
        text_column: the input text column.
        label_column: the label column (strings, or integers mapped through ``label_names``).
        label_names: label strings by integer id; default: the dataset's ``ClassLabel`` names
            when available, otherwise the sorted distinct string labels.
        template: the prompt template (``{text}`` is replaced by the input).
        train_split: split used for training.
        test_split: split used for evaluation.
        max_items: keep at most this many rows per split.

    Returns:
        The :class:`ClassificationTask`.
    """
    train_rows, test_rows = _hf_splits(dataset, train_split, test_split)
    if label_names is None:
        features = getattr(train_rows, "features", None)
        feature = features.get(label_column) if features is not None else None
        label_names = list(getattr(feature, "names", []) or [])

    def label_string(label: Any, row: int, split: str) -> str:
        if label_names and isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(label_names):
                raise ValueError(
                    f"split {split!r}, row {row}: label id {label} is outside label_names (0..{len(label_names) - 1})"
                )
            return label_names[label]
        if not isinstance(label, str):
            raise ValueError(f"split {split!r}, row {row}: column {label_column!r} holds {type(label).__name__} "
                             f"{label!r:.40}; labels must be strings, or integer ids with label_names")
        return label

    def pairs(rows, split: str) -> list[tuple[str, str]]:
        texts = _strings(_column(rows, text_column, max_items), text_column, split)
        labels = [label_string(label, row, split) for row, label in enumerate(_column(rows, label_column, max_items))]
        return list(zip(texts, labels))

    train, test = pairs(train_rows, train_split), pairs(test_rows, test_split)
    labels = list(label_names) if label_names else sorted({label for _, label in train + test})
    return ClassificationTask(name, train=train, test=test, labels=labels, template=template)


def concat_experience_datasets(datasets: Iterable[AvalancheDataset]) -> AvalancheDataset:
    """Concatenate experience datasets (keeps the first one's collate function).

    Raises:
        ValueError: nothing to concatenate.
    """
    datasets = list(datasets)
    if not datasets:
        raise ValueError("no datasets to concatenate")
    merged = datasets[0]
    for dataset in datasets[1:]:
        merged = merged.concat(dataset)
    return merged


# --------------------------------------------------------------------------- config-facing stream


def word_level_tokenizer(texts: Iterable[str], vocab_size: int | None = None):
    """A whitespace/punctuation word-level tokenizer fitted on ``texts``.

    For tiny from-scratch models on small streams: the vocabulary (and so the embedding and
    output layers) stays at a few hundred entries. Words outside the vocabulary map to
    ``<unk>``; ``<eos>`` ends texts and also pads.

    Args:
        texts: the texts to collect words from (most frequent first).
        vocab_size: cap on the vocabulary size, special tokens included.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    specials = ["<unk>", "<eos>"]
    budget = None if vocab_size is None else max(vocab_size - len(specials), 0)
    words = [word for word, _ in counts.most_common(budget)]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


class CompactVocabulary:
    """A tokenizer's own segmentation with ids renumbered to the tokens a stream actually uses.

    A from-scratch model only ever sees the tokens of its stream; with GPT-2's 50,257-entry
    vocabulary most of its embedding and output layer (and most of the compute of a tiny model)
    would go to tokens that never occur. This wrapper keeps the real tokenizer's segmentation
    and maps the ids found in ``texts`` to ``0..N-1`` (plus EOS/pad and an unknown-token slot),
    so the model needs only ``len(vocabulary)`` embeddings. :meth:`decode` maps back.

    Args:
        tokenizer: the underlying Hugging Face tokenizer.
        texts: the texts whose tokens form the vocabulary.
    """

    UNKNOWN = 0  # compact id of every token not seen when fitting

    def __init__(self, tokenizer, texts: Iterable[str]):
        self.tokenizer = tokenizer
        seen: set[int] = set()
        batch = list(texts)
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"] if batch else []:
            seen.update(ids)
        specials = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        self.to_original = [tokenizer.unk_token_id if tokenizer.unk_token_id is not None else -1]
        self.to_original += sorted((seen | specials) - {self.to_original[0]})
        self.to_compact = {original: compact for compact, original in enumerate(self.to_original)}

    def __len__(self) -> int:
        return len(self.to_original)

    def _compact(self, original: int | None) -> int | None:
        return None if original is None else self.to_compact.get(original, self.UNKNOWN)

    @property
    def eos_token_id(self) -> int | None:
        return self._compact(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int | None:
        return self._compact(self.tokenizer.pad_token_id)

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = False, **kwargs) -> dict[str, Any]:
        """Tokenise like the wrapped tokenizer and return compact ``input_ids``."""
        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]
        if isinstance(texts, str):
            return {"input_ids": [self.to_compact.get(i, self.UNKNOWN) for i in encoded]}
        return {"input_ids": [[self.to_compact.get(i, self.UNKNOWN) for i in ids] for ids in encoded]}

    def decode(self, ids: Sequence[int], **kwargs) -> str:
        """Text of compact ``ids`` (unknown slots decode as the tokenizer's unknown token)."""
        originals = [self.to_original[int(i)] for i in ids]
        return self.tokenizer.decode([i for i in originals if i >= 0], **kwargs)


def _task_texts(task: Task) -> list[str]:
    if isinstance(task, TextTask):
        return list(task.train) + list(task.test)
    return [task.prompt(text) + " " + label for text, label in list(task.train) + list(task.test)] + list(task.labels)


def _task_from_dict(spec: Mapping[str, Any], index: int) -> Task:
    """Inline task ``index`` from its config dict: with ``labels`` a ClassificationTask, otherwise a TextTask."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"tasks[{index}]: expected a mapping with name, train, test (and labels), got {spec!r:.60}")
    spec = dict(spec)
    try:
        if "labels" in spec:
            for split in ("train", "test"):  # YAML has no tuples: its pairs arrive as lists
                if isinstance(spec.get(split), list):
                    spec[split] = [tuple(pair) if isinstance(pair, list) else pair for pair in spec[split]]
            return ClassificationTask(**spec)
        return TextTask(**spec)
    except TypeError as error:
        raise ValueError(f"tasks[{index}] ({spec.get('name', '?')!r}): {error}") from None


@functools.lru_cache(maxsize=8)
def named_tokenizer(name: str):
    """:func:`metakv_cl.hub.load_tokenizer`, loaded once per process and name.

    Streams that share a tokenizer share the object (loading SmolLM2's from its GGUF takes
    seconds); :class:`CompactVocabulary` wraps it without changing it.
    """
    from metakv_cl.hub import load_tokenizer

    return load_tokenizer(name)


def _checked_loader(name: str, arguments: Mapping[str, Any], key: str) -> Callable[..., list[Task]]:
    """The registered loader ``name``, once ``arguments`` are known to fit its signature."""
    import inspect

    function = get_loader(name, key)
    signature = inspect.signature(function)
    try:
        signature.bind(**arguments)
    except TypeError as error:
        raise ValueError(
            f"{key}_args do not fit {name}: {error}; accepted arguments: {list(signature.parameters)}"
        ) from None
    return function


def _call_loader(name: str, arguments: Mapping[str, Any], key: str) -> list[Task]:
    """Call the registered loader ``name``; its result must be a non-empty list of tasks."""
    tasks = _checked_loader(name, arguments, key)(**arguments)
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, (TextTask, ClassificationTask)) for t in tasks):
        raise ValueError(f"{key} {name} returned {type(tasks).__name__}, not a list of TextTask / ClassificationTask")
    if not tasks:
        raise ValueError(f"{key} {name} returned no task (with {key}_args {dict(arguments)})")
    return list(tasks)


class TaskStream(pl.LightningDataModule):
    """The configurable description of a stream: where its tasks come from and how they are tokenised.

    This is what ``data:`` in the YAML configs instantiates (``class_path:
    metakv_cl.data.TaskStream``; a ``LightningDataModule`` so that ``LightningCLI`` takes it);
    :meth:`build` returns the :class:`LMBenchmark`, from which the strategies build one loader
    per experience.

    Args:
        loader: a registered task loader (:mod:`metakv_cl.data.registry`), by name or dotted
            path, e.g. ``synthetic_topic_tasks`` or ``metakv_cl.data.dbpedia.dbpedia_topic_tasks``.
            Ignored when ``tasks`` is given.
        loader_args: keyword arguments of the loader (checked against its signature).
        tasks: inline tasks instead of a loader: dicts with ``name``, ``train``, ``test`` (and
            ``labels``, optionally ``template``, for classification).
        tokenizer: tokenizer name or path for :func:`metakv_cl.hub.load_tokenizer`, or
            ``"word-level"`` for :func:`word_level_tokenizer` fitted on the stream's texts.
        word_level_vocab_size: vocabulary cap of the word-level tokenizer.
        compact_vocabulary: renumber the tokenizer's ids to those the stream uses
            (:class:`CompactVocabulary`): a from-scratch model then needs only
            :attr:`vocab_size` embeddings. The tokenizer's segmentation is unchanged.
        max_length: token limit per item; ``None`` = the model's number of positions.
        overflow: ``"chunk"``, ``"truncate"`` or ``"error"`` for over-long texts.
        warmup_experiences: how many leading tasks form the warm-up stream (pre-training of a
            from-scratch model before the continual stream; not evaluated).
        warmup_loader: a registered loader whose tasks form the warm-up stream instead
            (e.g. ``metakv_cl.data.wikitext.wikitext_tasks``: general text before a topic
            stream); once loaded, ``warmup_experiences`` is the number of tasks it returned.
        warmup_loader_args: keyword arguments of ``warmup_loader``.
        warmup_epochs: epochs of warm-up training (all parameters, LM loss).
        append_eos: end every text with the EOS token.
    """

    def __init__(
        self,
        loader: str = "metakv_cl.data.synthetic.synthetic_topic_tasks",
        loader_args: dict[str, Any] | None = None,
        tasks: list[dict[str, Any]] | None = None,
        tokenizer: str = "gpt2",
        word_level_vocab_size: int | None = None,
        compact_vocabulary: bool = False,
        max_length: int | None = None,
        overflow: Literal["chunk", "truncate", "error"] = "chunk",
        warmup_experiences: int = 0,
        warmup_loader: str | None = None,
        warmup_loader_args: dict[str, Any] | None = None,
        warmup_epochs: int = 1,
        append_eos: bool = True,
    ):
        super().__init__()
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"unknown overflow policy {overflow!r}; choose one of {', '.join(OVERFLOW_POLICIES)}")
        if warmup_experiences < 0:
            raise ValueError(f"warmup_experiences must be >= 0, got {warmup_experiences}")
        if warmup_loader is not None and warmup_experiences:
            raise ValueError(
                "give either warmup_experiences (leading tasks of the stream) or warmup_loader (tasks of "
                f"another loader) for the warm-up, not both (got {warmup_experiences} and {warmup_loader!r})"
            )
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens or null (the model's positions), got {max_length}")
        if word_level_vocab_size is not None and word_level_vocab_size < 3:
            raise ValueError(f"word_level_vocab_size must be at least 3 (<unk>, <eos> and a word) or null, "
                             f"got {word_level_vocab_size}")
        if warmup_epochs < 1 and (warmup_experiences or warmup_loader is not None):
            raise ValueError(f"warmup_epochs must be >= 1 when a warm-up is configured, got {warmup_epochs}")
        if tasks is None:  # refuse an unknown loader or misfit arguments before anything loads
            _checked_loader(loader, dict(loader_args or {}), "loader")
        elif not tasks:
            raise ValueError("tasks: the inline task list is empty; give at least one task, or no tasks and a loader")
        if warmup_loader is not None:
            _checked_loader(warmup_loader, dict(warmup_loader_args or {}), "warmup_loader")
        self.loader = loader
        self.loader_args = dict(loader_args or {})
        self.inline_tasks = tasks
        self.tokenizer_name = tokenizer
        self.word_level_vocab_size = word_level_vocab_size
        self.compact_vocabulary = compact_vocabulary
        self.max_length = max_length
        self.overflow = overflow
        self.warmup_experiences = warmup_experiences
        self.warmup_loader = warmup_loader
        self.warmup_loader_args = dict(warmup_loader_args or {})
        self.warmup_epochs = warmup_epochs
        self.append_eos = append_eos
        self._tasks: list[Task] | None = None
        self._tokenizer = None

    def tasks(self) -> list[Task]:
        """Load (once) and return every task, warm-up tasks first."""
        if self._tasks is None:
            if self.inline_tasks is not None:
                tasks = [_task_from_dict(spec, index) for index, spec in enumerate(self.inline_tasks)]
            else:
                tasks = _call_loader(self.loader, self.loader_args, "loader")
            if self.warmup_loader is not None:
                warmup = _call_loader(self.warmup_loader, self.warmup_loader_args, "warmup_loader")
                self.warmup_experiences = len(warmup)
                tasks = warmup + tasks
            self._tasks = tasks
            if len(self._tasks) <= self.warmup_experiences:
                raise ValueError(
                    f"the stream has {len(self._tasks)} task(s) but warmup_experiences={self.warmup_experiences}: "
                    "no experience is left for the continual stream"
                )
        return self._tasks

    def tokenizer(self):
        """The tokenizer (loaded or fitted once)."""
        if self._tokenizer is None:
            texts = [text for task in self.tasks() for text in _task_texts(task)]
            if self.tokenizer_name == "word-level":
                self._tokenizer = word_level_tokenizer(texts, self.word_level_vocab_size)
            else:
                self._tokenizer = named_tokenizer(self.tokenizer_name)
                if self.compact_vocabulary:
                    self._tokenizer = CompactVocabulary(self._tokenizer, texts)
        return self._tokenizer

    @property
    def vocab_size(self) -> int | None:
        """Size of the stream's own vocabulary (word-level or compact), else None (the model's)."""
        if self.tokenizer_name == "word-level" or self.compact_vocabulary:
            return len(self.tokenizer())
        return None

    def build(self, model_max_positions: int | None = None) -> LMBenchmark:
        """Tokenise the tasks into the benchmark.

        Args:
            model_max_positions: the model's position limit; caps (and defaults) ``max_length``.

        Returns:
            The :class:`LMBenchmark`.

        Raises:
            ValueError: ``max_length`` exceeds the model's positions, or any error of
                :func:`make_benchmark`.
        """
        max_length = self.max_length or model_max_positions or 128
        if model_max_positions is not None and max_length > model_max_positions:
            raise ValueError(
                f"max_length={max_length} exceeds the model's {model_max_positions} positions; "
                "lower data.max_length (longer texts are chunked or truncated by data.overflow)"
            )
        tasks = self.tasks()
        return make_benchmark(
            tasks[self.warmup_experiences :],
            self.tokenizer(),
            max_length=max_length,
            overflow=self.overflow,
            append_eos=self.append_eos,
            warmup_tasks=tasks[: self.warmup_experiences],
        )
