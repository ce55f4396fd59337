"""Topic-split Wikipedia: the 14 DBpedia topics as a stream of language-modelling experiences.

Each DBpedia-14 record is a Wikipedia article abstract with one of 14 topic labels. The
stream groups the topics into experiences (by default 7 experiences of 2 topics) and holds
out a fraction of each topic's abstracts for perplexity.

Data: ``<project>/../shared/data/dbpedia14/`` (``test.json``: a JSON list of
``{"label", "sentence": "Title: ...\\nText: ..."}``, plus ``labels.json``), or a folder given
by ``root`` or the ``METAKV_CL_DATA`` environment variable (the folder that *contains*
``dbpedia14/``). When no local copy exists and the Hugging Face ``datasets`` package is
installed, the ``dbpedia_14`` dataset (its ``test`` split, 5,000 abstracts per topic) is
loaded from the hub instead.

This module also holds the small I/O helpers the other real-data loaders share: the
default data root, the labelled-JSON reader and the seeded train/test split.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Sequence, TypeVar

from metakv_cl.data.registry import register_loader
from metakv_cl.data.tasks import TextTask
from metakv_cl.files import read_json

__all__ = [
    "DATA_ROOT_ENV",
    "DBPEDIA_TOPICS",
    "default_data_root",
    "read_labelled_json",
    "split_holdout",
    "load_dbpedia_records",
    "dbpedia_topic_tasks",
]

DATA_ROOT_ENV = "METAKV_CL_DATA"

# The dataset's own label order (dbpedia_14 label ids 0..13): the "fixed" experience order.
DBPEDIA_TOPICS = (
    "Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
    "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work",
)

Item = TypeVar("Item")


def default_data_root() -> Path:
    """The shared data folder: ``$METAKV_CL_DATA`` if set, else ``<project>/../shared/data``."""
    configured = os.environ.get(DATA_ROOT_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_labelled_json(path: str | Path) -> list[tuple[str, str]]:
    """Read a JSON list of ``{"label": str, "sentence": str}`` records.

    Args:
        path: the JSON file.

    Returns:
        ``(sentence, label)`` pairs in file order.

    Raises:
        FileNotFoundError: if ``path`` does not exist (the message names it).
        ValueError: if the file is not such a list, or is empty.
    """
    path = Path(path)
    records = read_json(path, "data file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{'label', 'sentence'}} records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: no records (an experience needs data)")
    pairs = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"label", "sentence"} <= record.keys():
            raise ValueError(f"{path}: record {index} is not a {{'label', 'sentence'}} object: {str(record)[:80]}")
        for key in ("sentence", "label"):  # str() would turn a null label into the label "None"
            if not isinstance(record[key], str):
                raise ValueError(f"{path}: record {index} has a {type(record[key]).__name__} {key} "
                                 f"{record[key]!r:.40}; it must be a string")
        pairs.append((record["sentence"], record["label"]))
    return pairs


# Development items do not depend on a stream's seed: every stream of a loader leaves out the same ones.
_DEVELOPMENT_SEED = "development-items"


def set_aside_development(pool: Sequence[Item], count: int, what: str) -> tuple[list[Item], list[Item]]:
    """(development items, the rest): ``count`` items of a fixed shuffle of ``pool`` (no seed moves it),
    kept for choosing hyper-parameters and left out of every reported stream.

    Args:
        pool: the items of one task or topic.
        count: how many to set aside.
        what: the task or topic (seeds the shuffle; names it in errors).

    Raises:
        ValueError: ``count`` leaves no item for the reported streams.
    """
    if count >= len(pool):
        raise ValueError(f"development_items={count} leaves none of {what}'s {len(pool)} items to report on")
    shuffled = list(pool)
    random.Random(f"{_DEVELOPMENT_SEED}-{what}").shuffle(shuffled)
    return shuffled[:count], shuffled[count:]


def split_holdout(items: Sequence[Item], test_fraction: float, seed: int | str, what: str) -> tuple[list[Item], list[Item]]:
    """Shuffle ``items`` with ``seed`` and hold out ``test_fraction`` of them.

    Args:
        items: what to split.
        test_fraction: share of items for the test split, in (0, 1); at least one item goes
            to each split.
        seed: shuffling seed (ints and strings both give reproducible orders).
        what: a name for error messages (e.g. the topic).

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: if ``test_fraction`` is outside (0, 1) or there are fewer than 2 items.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(items) < 2:
        raise ValueError(f"{what}: needs at least 2 items to make a train and a test split, got {len(items)}")
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    num_test = min(max(1, round(len(shuffled) * test_fraction)), len(shuffled) - 1)
    return shuffled[num_test:], shuffled[:num_test]


def _abstract_text(sentence: str) -> str:
    """``"Title: T\\nText:  body"`` -> ``"T\\nbody"`` (other layouts are kept, stripped)."""
    match = re.match(r"\s*Title:\s*(.*?)\s*\n\s*Text:\s*(.*)", sentence, flags=re.DOTALL)
    return f"{match.group(1)}\n{match.group(2).strip()}" if match else sentence.strip()


def _spaced_label(name: str) -> str:
    """Hub label names are CamelCase (``"MeanOfTransportation"``); the local files' are spaced."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace(" Of ", " of ")


def _records_from_hub(missing: Path) -> list[tuple[str, str]]:
    """The hub's ``dbpedia_14`` test split; FileNotFoundError (naming ``missing``) if unavailable."""
    try:
        from datasets import load_dataset  # optional dependency, only for the hub fallback
    except ImportError as error:
        raise FileNotFoundError(
            f"DBpedia-14 data not found: {missing} (pass root=<folder with test.json>, set ${DATA_ROOT_ENV}, "
            "or install `datasets` to load dbpedia_14 from the hub)"
        ) from error
    try:
        dataset = load_dataset("dbpedia_14", split="test")
    except Exception as error:  # offline, hub errors: report the local path too
        raise FileNotFoundError(f"DBpedia-14 data not found: {missing}, and the hub failed: {error}") from error
    names = dataset.features["label"].names
    return [(f"{row['title']}\n{row['content'].strip()}", _spaced_label(names[row["label"]])) for row in dataset]


def load_dbpedia_records(root: str | Path | None = None) -> list[tuple[str, str]]:
    """All DBpedia-14 abstracts as ``(text, topic)`` pairs, text = ``"title\\nabstract"``.

    Args:
        root: the ``dbpedia14`` folder. Default: ``default_data_root() / "dbpedia14"``, and
            when that is missing, the hub's ``dbpedia_14`` test split if ``datasets`` is installed.

    Returns:
        ``(text, topic)`` pairs.

    Raises:
        FileNotFoundError: if ``test.json`` is missing (the message names the path looked
            at); with the default root, only once the hub fallback failed too.
    """
    folder = Path(root) if root is not None else default_data_root() / "dbpedia14"
    data_file = folder / "test.json"
    if not data_file.is_file() and root is None:
        return _records_from_hub(data_file)
    return [(_abstract_text(sentence), label) for sentence, label in read_labelled_json(data_file)]


def _ordered_topics(present: set[str], order: str, seed: int) -> list[str]:
    topics = [topic for topic in DBPEDIA_TOPICS if topic in present] + sorted(present - set(DBPEDIA_TOPICS))
    if order == "shuffled":
        random.Random(seed).shuffle(topics)
    elif order != "fixed":
        raise ValueError(f"order must be 'fixed' or 'shuffled', got {order!r}")
    return topics


@register_loader
def dbpedia_topic_tasks(
    root: str | Path | None = None,
    topics_per_experience: int = 2,
    order: str = "fixed",
    seed: int = 0,
    order_seed: int | None = None,
    max_train_per_topic: int | None = None,
    test_fraction: float = 0.2,
    max_test_per_topic: int | None = None,
    development_items: int = 0,
    development: bool = False,
    validation_fraction: float = 0.25,
) -> list[TextTask]:
    """The topic-split Wikipedia stream: DBpedia topics grouped into LM experiences.

    Args:
        root: the ``dbpedia14`` folder (see :func:`load_dbpedia_records` for the default).
        topics_per_experience: topics per experience; 14 topics with the default 2 give 7
            experiences. When it does not divide the number of topics, the last experience
            holds the remainder.
        order: ``"fixed"``: the dataset's label order (Company, Educational Institution,
            Artist, Athlete, Office Holder, Mean of Transportation, Building, Natural Place,
            Village, Animal, Plant, Album, Film, Written Work); ``"shuffled"``: that list
            shuffled with ``order_seed``. With ``order_seed=0`` the 7 experiences are
            Educational Institution + Plant, Animal + Mean of Transportation, Album + Artist,
            Athlete + Natural Place, Village + Office Holder, Company + Film, Building + Written Work.
        seed: seeds each topic's train/test split (and the topic shuffle when ``order_seed`` is None).
        order_seed: seeds the topic shuffle alone, so one shuffled order can be kept while
            ``seed`` varies (default: ``seed``).
        max_train_per_topic: cap on training abstracts per topic (default: all).
        test_fraction: share of each topic's abstracts held out for evaluation.
        max_test_per_topic: cap on held-out abstracts per topic (default: all).
        development_items: abstracts per topic set aside for choosing hyper-parameters (a fixed
            shuffle that neither ``seed`` nor the order moves), left out of every stream unless
            ``development``; every stream that is reported beside a development stream sets the same.
        development: build the development stream from the set-aside abstracts alone: a seeded
            ``validation_fraction`` of them is its test set, the rest its training set.
        validation_fraction: the development stream's share of test abstracts.

    Returns:
        One :class:`TextTask` per experience, named ``"Topic A + Topic B"``; texts are
        ``"title\\nabstract"``.

    Raises:
        FileNotFoundError: if the data is missing.
        ValueError: on an unknown order or out-of-range sizes.
    """
    if topics_per_experience < 1:
        raise ValueError(f"topics_per_experience must be at least 1, got {topics_per_experience}")
    if development_items < 0 or (development and development_items < 2):
        raise ValueError(f"development_items must be >= 0 (>= 2 with development=True), got {development_items}")
    for name, cap in (("max_train_per_topic", max_train_per_topic), ("max_test_per_topic", max_test_per_topic)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be at least 1 or None, got {cap}")
    texts_by_topic: dict[str, list[str]] = {}
    for text, topic in load_dbpedia_records(root):
        texts_by_topic.setdefault(topic, []).append(text)
    topics = _ordered_topics(set(texts_by_topic), order, seed if order_seed is None else order_seed)

    tasks = []
    for start in range(0, len(topics), topics_per_experience):
        group = topics[start:start + topics_per_experience]
        train, test = [], []
        for topic in group:
            pool = texts_by_topic[topic]
            if development_items:
                set_aside, pool = set_aside_development(pool, development_items, topic)
            if development:
                topic_train, topic_test = split_holdout(set_aside, validation_fraction, f"{seed}-{topic}-validation", topic)
            else:
                topic_train, topic_test = split_holdout(pool, test_fraction, f"{seed}-{topic}", topic)
            train += topic_train[:max_train_per_topic]
            test += topic_test[:max_test_per_topic]
        name = " + ".join(group)
        random.Random(f"{seed}-{name}").shuffle(train)  # interleave the topics of one experience
        tasks.append(TextTask(name=name, train=train, test=test))
    return tasks
