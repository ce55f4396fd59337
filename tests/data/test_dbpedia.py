"""Topic-split Wikipedia (DBpedia-14) stream: real data, generated data, hub fallback, errors."""

import sys
from types import SimpleNamespace

import pytest

from metakv_cl.data.dbpedia import DATA_ROOT_ENV, DBPEDIA_TOPICS, dbpedia_topic_tasks, split_holdout


def test_real_data_fixed_order(shared_data):
    tasks = dbpedia_topic_tasks(root=shared_data / "dbpedia14")
    assert [task.name for task in tasks] == [
        "Company + Educational Institution", "Artist + Athlete", "Office Holder + Mean of Transportation",
        "Building + Natural Place", "Village + Animal", "Plant + Album", "Film + Written Work",
    ]
    total = sum(len(task.train) + len(task.test) for task in tasks)
    assert total == 7600
    for task in tasks:
        assert 0.18 < len(task.test) / (len(task.train) + len(task.test)) < 0.22
        assert not set(task.train) & set(task.test)
        assert all("\n" in text and not text.startswith("Title:") for text in task.train[:20])


def test_real_data_shuffled_order_and_caps(shared_data):
    first = dbpedia_topic_tasks(root=shared_data / "dbpedia14", order="shuffled", seed=1, topics_per_experience=3,
                                max_train_per_topic=10, max_test_per_topic=3)
    again = dbpedia_topic_tasks(root=shared_data / "dbpedia14", order="shuffled", seed=1, topics_per_experience=3,
                                max_train_per_topic=10, max_test_per_topic=3)
    other = dbpedia_topic_tasks(root=shared_data / "dbpedia14", order="shuffled", seed=2, topics_per_experience=3)
    assert [t.name for t in first] == [t.name for t in again] and first[0].train == again[0].train
    assert [t.name for t in first] != [t.name for t in other]
    assert [len(t.train) for t in first] == [30, 30, 30, 30, 20]  # 14 topics: 4 groups of 3, then 2
    assert [len(t.test) for t in first] == [9, 9, 9, 9, 6]
    topics = [topic for task in first for topic in task.name.split(" + ")]
    assert sorted(topics) == sorted(DBPEDIA_TOPICS)


def test_generated_data_and_unknown_topics_last(tmp_path, write_labelled):
    pairs = [(f"Title: {label} {i}\nText:  About {label} number {i}.\n", label)
             for label in ("Robot", "Artist", "Company") for i in range(5)]
    write_labelled(tmp_path / "test.json", pairs)
    tasks = dbpedia_topic_tasks(root=tmp_path, topics_per_experience=2, test_fraction=0.4)
    assert [task.name for task in tasks] == ["Company + Artist", "Robot"]
    assert sorted(tasks[1].train + tasks[1].test) == [f"Robot {i}\nAbout Robot number {i}." for i in range(5)]
    assert len(tasks[1].test) == 2


def test_hub_fallback_maps_label_names(tmp_path, monkeypatch):
    label_names = ["Company", "EducationalInstitution", "MeanOfTransportation"]
    rows = [{"label": label, "title": f"T{label}{i}", "content": f" body {i} "} for label in range(3) for i in range(3)]

    class FakeDataset(list):
        features = {"label": SimpleNamespace(names=label_names)}

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset(rows)

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    tasks = dbpedia_topic_tasks(topics_per_experience=1)
    assert calls == [("dbpedia_14", "test")]
    assert [task.name for task in tasks] == ["Company", "Educational Institution", "Mean of Transportation"]
    assert sorted(tasks[2].train + tasks[2].test) == ["T20\nbody 0", "T21\nbody 1", "T22\nbody 2"]


def test_missing_data_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent" / "test.json")):
        dbpedia_topic_tasks(root=tmp_path / "absent")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dbpedia_topic_tasks()


def test_bad_arguments_and_data(tmp_path, write_labelled):
    write_labelled(tmp_path / "ok" / "test.json", [("Title: a\nText: x", "Company"), ("Title: b\nText: y", "Company")])
    with pytest.raises(ValueError, match="order"):
        dbpedia_topic_tasks(root=tmp_path / "ok", order="random")
    with pytest.raises(ValueError, match="topics_per_experience"):
        dbpedia_topic_tasks(root=tmp_path / "ok", topics_per_experience=0)
    write_labelled(tmp_path / "empty" / "test.json", [])
    with pytest.raises(ValueError, match="no records"):
        dbpedia_topic_tasks(root=tmp_path / "empty")
    write_labelled(tmp_path / "single" / "test.json", [("Title: a\nText: x", "Film")])
    with pytest.raises(ValueError, match="Film: needs at least 2"):
        dbpedia_topic_tasks(root=tmp_path / "single")


def test_split_holdout_sizes():
    train, test = split_holdout(list(range(10)), 0.25, seed=3, what="x")
    assert len(test) == 2 and len(train) == 8 and sorted(train + test) == list(range(10))
    assert split_holdout(list(range(10)), 0.25, seed=3, what="x") == (train, test)
    assert [len(part) for part in split_holdout([1, 2], 0.9, seed=0, what="x")] == [1, 1]
    with pytest.raises(ValueError, match="test_fraction"):
        split_holdout([1, 2, 3], 1.0, seed=0, what="x")


def test_order_seed_keeps_one_shuffled_order_across_seeds(shared_data):
    def names(seed, order_seed):
        tasks = dbpedia_topic_tasks(root=shared_data / "dbpedia14", order="shuffled", seed=seed, order_seed=order_seed,
                                    max_train_per_topic=2, max_test_per_topic=1)
        return [task.name for task in tasks], tasks

    documented, first = names(seed=0, order_seed=0)
    assert documented == [
        "Educational Institution + Plant", "Animal + Mean of Transportation", "Album + Artist",
        "Athlete + Natural Place", "Village + Office Holder", "Company + Film", "Building + Written Work",
    ]
    same_order, second = names(seed=5, order_seed=0)
    assert same_order == documented
    assert first[0].train != second[0].train  # seed still draws the split


def test_development_abstracts_stay_out_of_every_reported_stream(shared_data):
    root = shared_data / "dbpedia14"
    development = dbpedia_topic_tasks(root=root, development_items=24, development=True, validation_fraction=0.25)
    dev_train = {text for task in development for text in task.train}
    dev_test = {text for task in development for text in task.test}
    assert len(dev_train) == 14 * 18 and len(dev_test) == 14 * 6 and not dev_train & dev_test
    for order, seed in (("fixed", 1), ("shuffled", 2)):
        reported = dbpedia_topic_tasks(root=root, order=order, seed=seed, order_seed=0, development_items=24,
                                       test_fraction=0.5)
        seen = {text for task in reported for text in (*task.train, *task.test)}
        assert not seen & (dev_train | dev_test)  # the same abstracts set aside, whatever the seed and order
        assert len(seen) == 7600 - 14 * 24
    # without development items the stream is the one it always was
    assert dbpedia_topic_tasks(root=root, seed=3)[0].train == dbpedia_topic_tasks(root=root, seed=3, development_items=0)[0].train
    with pytest.raises(ValueError, match=r"development_items must be >= 0 \(>= 2 with development=True\), got 0"):
        dbpedia_topic_tasks(root=root, development=True)
