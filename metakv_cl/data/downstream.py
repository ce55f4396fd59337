"""Sequential downstream classification tasks: the standard text-classification CL orders.

Orders 1 to 3 are the 4-task "standard CL benchmark" orders of Progressive Prompts
(Razdaibiedina et al. 2023) and O-LoRA (Wang et al. 2023), as in O-LoRA's
``scripts/order_{1,2,3}.sh``:

- order 1: dbpedia -> amazon -> yahoo -> agnews
- order 2: dbpedia -> amazon -> agnews -> yahoo
- order 3: yahoo -> amazon -> agnews -> dbpedia

**Substitution**: Yahoo Answers is not in the offline data, so it is replaced by QQP (by
default; see ``yahoo_substitute``): like Yahoo Answers its inputs are user-written questions
from a community Q&A site (Quora), and it is one of the benchmark's own tasks. The task is
named ``"qqp (yahoo substitute)"`` in reports so no table can pass it off as Yahoo.
Results on these orders are therefore not directly comparable with published numbers.

``"long_mixed"`` is the long-sequence benchmark's order 4 (MNLI -> CB -> WiC -> COPA -> QQP ->
BoolQA -> RTE -> IMDB -> Yelp -> Amazon -> SST-2 -> DBpedia -> AG News -> MultiRC -> Yahoo)
restricted to the 11 tasks available here (IMDB, Yelp, MultiRC and Yahoo are dropped): it
mixes NLI, word sense, causal reasoning, paraphrase, QA-style, sentiment and topic tasks.

Examples without a gold label (MNLI's ``"-"``: 131 of its 7,600 test examples) are dropped;
any other label missing from ``labels.json`` is an error. Every task is scored by label-string likelihood: the prompt is the task's template with the
input inserted, and the label strings come from the task's ``labels.json``.

Data: ``<root>/cl_benchmark/<task>/{train,test,labels}.json`` and, for dbpedia (whose only
offline split is DBpedia-14's 7,600-abstract test set), ``<root>/dbpedia14/`` split once into
80% train / 20% test with a fixed seed, so the test abstracts never depend on ``seed``.
``root`` defaults to :func:`metakv_cl.data.dbpedia.default_data_root`.

**Development items.** ``development_items=N`` sets aside N items of each task's training pool
(a fixed shuffle that no ``seed`` changes) for choosing hyper-parameters. With
``development=True`` the stream is built from those items alone: its test set is a seeded
``validation_fraction`` of them, its training set the rest. Otherwise they are left out, so a
reported stream never trains or tests on an item the development stream saw. Test items come
from the task's test file (DBpedia: its fixed held-out split), never from the training pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from metakv_cl.data.dbpedia import default_data_root, read_labelled_json, set_aside_development, split_holdout
from metakv_cl.data.registry import register_loader
from metakv_cl.data.tasks import ClassificationTask
from metakv_cl.files import read_json

__all__ = ["DownstreamSpec", "DOWNSTREAM_TASKS", "DOWNSTREAM_ORDERS", "downstream_tasks"]


@dataclass(frozen=True)
class DownstreamSpec:
    """Where a task's data lives and how it is prompted.

    Args:
        folder: folder under the data root (``cl_benchmark/<task>`` or ``dbpedia14``).
        template: the prompt; ``{text}`` is the input, the label string follows after a space.
    """

    folder: str
    template: str


_ENTAILMENT = "Does sentence 1 entail sentence 2? Answer {labels}.\n{{text}}\nAnswer:"

DOWNSTREAM_TASKS: dict[str, DownstreamSpec] = {
    "dbpedia": DownstreamSpec("dbpedia14", "What is the topic of this Wikipedia article?\n{text}\nTopic:"),
    "amazon": DownstreamSpec("cl_benchmark/amazon", "How does this product review rate the product?\n{text}\nRating:"),
    "agnews": DownstreamSpec("cl_benchmark/agnews", "What is the topic of this news article?\n{text}\nTopic:"),
    "sst-2": DownstreamSpec("cl_benchmark/SST-2", "Is this movie review good or bad?\n{text}\nSentiment:"),
    "mnli": DownstreamSpec("cl_benchmark/MNLI", _ENTAILMENT.format(labels="entailment, neutral or contradiction")),
    "cb": DownstreamSpec("cl_benchmark/CB", _ENTAILMENT.format(labels="entailment, neutral or contradiction")),
    "rte": DownstreamSpec("cl_benchmark/RTE", _ENTAILMENT.format(labels="entailment or contradiction")),
    "qqp": DownstreamSpec("cl_benchmark/QQP", "Do these two questions ask the same thing? Answer True or False.\n"
                                              "{text}\nAnswer:"),
    "wic": DownstreamSpec("cl_benchmark/WiC", "Is the word used with the same meaning in both sentences? "
                                              "Answer True or False.\n{text}\nAnswer:"),
    "copa": DownstreamSpec("cl_benchmark/COPA", "{text}\nAnswer:"),  # the input already asks "A or B"
    "boolqa": DownstreamSpec("cl_benchmark/BoolQA", "Answer the question about the passage with True or False.\n"
                                                    "{text}\nAnswer:"),
}

# "yahoo" marks the slot of the unavailable Yahoo Answers task (filled by yahoo_substitute).
DOWNSTREAM_ORDERS: dict[str, tuple[str, ...]] = {
    "1": ("dbpedia", "amazon", "yahoo", "agnews"),
    "2": ("dbpedia", "amazon", "agnews", "yahoo"),
    "3": ("yahoo", "amazon", "agnews", "dbpedia"),
    "long_mixed": ("mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "amazon", "sst-2", "dbpedia", "agnews"),
}

# DBpedia's offline train/test split is fixed, independent of `seed`.
_DBPEDIA_SPLIT_SEED = "dbpedia-downstream-split"
_DBPEDIA_TEST_FRACTION = 0.2
# MNLI's test file marks 131 examples without a gold label (annotators disagreed) with "-".
_NO_GOLD_LABEL = "-"


def _order_key(order: int | str) -> str:
    key = str(order).strip().lower().removeprefix("order").strip("_ ")
    if key not in DOWNSTREAM_ORDERS:
        raise ValueError(f"unknown downstream order {order!r}; known: 1, 2, 3, 'long_mixed'")
    return key


def _read_labels(folder: Path) -> list[str]:
    labels_file = folder / "labels.json"
    labels = read_json(labels_file, "labels file")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{labels_file}: expected a JSON list of at least two label strings, got {labels!r:.80}")
    return labels


def _read_gold(path: Path) -> list[tuple[str, str]]:
    """Labelled pairs without MNLI-style "no gold label" rows (label ``"-"``: annotators disagreed)."""
    pairs = [(text.strip(), label) for text, label in read_labelled_json(path) if label != _NO_GOLD_LABEL]
    if not pairs:
        raise ValueError(f"{path}: no labelled examples (an experience needs data)")
    return pairs


def _load_splits(task: str, root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    folder = root / DOWNSTREAM_TASKS[task].folder
    if task == "dbpedia":
        return split_holdout(_read_gold(folder / "test.json"), _DBPEDIA_TEST_FRACTION, _DBPEDIA_SPLIT_SEED, "dbpedia")
    return _read_gold(folder / "train.json"), _read_gold(folder / "test.json")


def _subsample(pairs: list[tuple[str, str]], limit: int | None, seed: str) -> list[tuple[str, str]]:
    """A seeded random subset (files can be sorted by label, so never just the first rows)."""
    if limit is None or limit >= len(pairs):
        return list(pairs)
    return random.Random(seed).sample(pairs, limit)


@register_loader
def downstream_tasks(
    order: int | str = 1,
    root: str | Path | None = None,
    max_train: int | None = 1000,
    max_test: int | None = 500,
    seed: int = 0,
    yahoo_substitute: str = "qqp",
    development_items: int = 0,
    development: bool = False,
    validation_fraction: float = 0.2,
) -> list[ClassificationTask]:
    """A sequential downstream classification stream.

    Args:
        order: 1, 2, 3 (also ``"order1"`` ...) or ``"long_mixed"``; see the module docstring.
        root: the data root holding ``cl_benchmark/`` and ``dbpedia14/`` (default:
            :func:`~metakv_cl.data.dbpedia.default_data_root`).
        max_train: training examples per task, a seeded random subset (None: all).
        max_test: test examples per task, a seeded random subset (None: all).
        seed: seeds the subsets.
        yahoo_substitute: the available task that takes Yahoo Answers' place in orders 1-3
            (one of :data:`DOWNSTREAM_TASKS`, not already in the order).
        development_items: training items per task set aside for development (see the module
            docstring); left out of every stream unless ``development``.
        development: build the development stream: training and validation items carved from
            the set-aside items (the validation items are its test set).
        validation_fraction: share of the development items that are the development stream's
            test set.

    Returns:
        One :class:`ClassificationTask` per task, in order, with the task's template and the
        label strings of its ``labels.json``.

    Raises:
        ValueError: on an unknown order, a bad substitute, bad sizes, or an empty data file.
        FileNotFoundError: if a task's data file is missing (the message names it).
    """
    key = _order_key(order)
    task_names = list(DOWNSTREAM_ORDERS[key])
    if "yahoo" in task_names:
        substitute = yahoo_substitute.lower()
        if substitute not in DOWNSTREAM_TASKS or substitute in task_names:
            raise ValueError(f"yahoo_substitute must be a task of {sorted(DOWNSTREAM_TASKS)} not already in order "
                             f"{key} ({task_names}), got {yahoo_substitute!r}")
    for name, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be at least 1 or None, got {limit}")
    if development_items < 0 or (development and development_items < 2):
        raise ValueError(f"development_items must be >= 0 (>= 2 with development=True), got {development_items}")
    data_root = Path(root) if root is not None else default_data_root()

    tasks = []
    for slot in task_names:
        task = yahoo_substitute.lower() if slot == "yahoo" else slot
        spec = DOWNSTREAM_TASKS[task]
        train, test = _load_splits(task, data_root)
        if development_items:
            set_aside, train = set_aside_development(train, development_items, task)
            if development:
                train, test = split_holdout(set_aside, validation_fraction, f"{seed}-{task}-validation", task)
        tasks.append(ClassificationTask(
            name=f"{task} (yahoo substitute)" if slot == "yahoo" else task,
            train=_subsample(train, max_train, f"{seed}-{task}-train"),
            test=_subsample(test, max_test, f"{seed}-{task}-test"),
            labels=_read_labels(data_root / spec.folder),
            template=spec.template,
        ))
    return tasks
