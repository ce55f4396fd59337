"""Task specifications: the plain-Python description of one experience of a stream.

A stream is a list of tasks. Each task is either language modelling over texts
(:class:`TextTask`, scored by held-out loss / perplexity) or classification
(:class:`ClassificationTask`, scored by accuracy: the label string with the highest
log-likelihood given the prompt wins). Loaders (synthetic topics, DBpedia, Wikipedia dumps,
downstream benchmarks) return these; :mod:`metakv_cl.data.stream` turns them into an
Avalanche benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass
class TextTask:
    """A language-modelling experience.

    Args:
        name: experience name shown in reports.
        train: training texts.
        test: held-out texts (loss / perplexity is measured on these).
    """

    name: str
    train: Sequence[str]
    test: Sequence[str]
    kind: str = field(default="lm", init=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        for split in ("train", "test"):
            texts = getattr(self, split)
            _check_nonempty(self.name, split, texts)
            for index, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(f"task {self.name!r}: {split}[{index}] must be a string, got {_shown(text)}")


@dataclass
class ClassificationTask:
    """A classification experience, scored by label-string likelihood.

    Args:
        name: experience name shown in reports.
        train: (text, label) pairs.
        test: (text, label) pairs.
        labels: the label strings; every pair's label must be one of them.
        template: how an input is shown to the model; ``{text}`` is replaced by the input and
            the label string follows the template (after a space).
    """

    name: str
    train: Sequence[tuple[str, str]]
    test: Sequence[tuple[str, str]]
    labels: Sequence[str]
    template: str = "{text}\nAnswer:"
    kind: str = field(default="classification", init=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if isinstance(self.labels, str) or not all(isinstance(label, str) for label in self.labels):
            raise ValueError(f"task {self.name!r}: labels must be a list of strings, got {_shown(self.labels)}")
        for split in ("train", "test"):
            pairs = getattr(self, split)
            _check_nonempty(self.name, split, pairs)
            for index, pair in enumerate(pairs):
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                    raise ValueError(f"task {self.name!r}: {split}[{index}] must be a (text, label) pair of strings, "
                                     f"got {_shown(pair)}")
        if len(set(self.labels)) < 2:
            raise ValueError(f"task {self.name!r}: needs at least two distinct labels, got {list(self.labels)}")
        if "{text}" not in self.template:
            raise ValueError(f"task {self.name!r}: template must contain '{{text}}', got {self.template!r}")
        known = set(self.labels)
        for split in ("train", "test"):
            unknown = {label for _, label in getattr(self, split)} - known
            if unknown:
                raise ValueError(f"task {self.name!r}: {split} has labels not in `labels`: {sorted(unknown)[:5]}")

    def prompt(self, text: str) -> str:
        """The model input for ``text``; the label string follows it after a space."""
        return self.template.format(text=text)


Task = TextTask | ClassificationTask


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a task name must be a non-empty string, got {_shown(name)}")


def _shown(value: object) -> str:
    """A value for an error message: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _check_nonempty(task_name: str, split: str, items: Sequence) -> None:
    # a string is a sequence of characters: as a split it would train on one-character texts
    indexable = hasattr(items, "__len__") and hasattr(items, "__getitem__")  # lists, tuples, arrays
    if isinstance(items, (str, bytes, Mapping)) or not indexable:
        raise ValueError(f"task {task_name!r}: {split} must be a list, got {_shown(items)}")
    if len(items) == 0:
        raise ValueError(f"task {task_name!r}: the {split} split is empty (an experience needs data)")
