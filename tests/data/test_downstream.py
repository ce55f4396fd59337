"""Sequential downstream classification orders: real data, generated data, errors."""

import json

import pytest

from metakv_cl.data.downstream import DOWNSTREAM_ORDERS, DOWNSTREAM_TASKS, downstream_tasks
from metakv_cl.data.tasks import ClassificationTask


def test_real_orders_1_to_3(shared_data):
    expected = {
        1: ["dbpedia", "amazon", "qqp (yahoo substitute)", "agnews"],
        "order2": ["dbpedia", "amazon", "agnews", "qqp (yahoo substitute)"],
        "3": ["qqp (yahoo substitute)", "amazon", "agnews", "dbpedia"],
    }
    for order, names in expected.items():
        tasks = downstream_tasks(order, root=shared_data, max_train=40, max_test=20)
        assert [task.name for task in tasks] == names
        assert all(isinstance(t, ClassificationTask) and len(t.train) == 40 and len(t.test) == 20 for t in tasks)
    amazon = tasks[1]
    assert list(amazon.labels) == ["very negative", "negative", "neutral", "positive", "very positive"]
    prompt = amazon.prompt(amazon.test[0][0])
    assert prompt.startswith("How does this product review rate the product?\nTitle:")
    assert prompt.endswith("\nRating:") and "\n\nRating:" not in prompt


def test_real_long_mixed_stream(shared_data):
    tasks = downstream_tasks("long_mixed", root=shared_data, max_train=None, max_test=None)
    assert [task.name for task in tasks] == list(DOWNSTREAM_ORDERS["long_mixed"])
    sizes = {task.name: (len(task.train), len(task.test)) for task in tasks}
    assert sizes["cb"] == (250, 56)
    assert sizes["mnli"] == (3000, 7600 - 131)  # MNLI's "-" (no gold label) rows are dropped
    assert sizes["dbpedia"] == (6080, 1520)  # DBpedia-14's 7,600 abstracts split 80/20
    assert len(tasks[tasks.index(next(t for t in tasks if t.name == "dbpedia"))].labels) == 14


def test_dbpedia_test_split_does_not_depend_on_seed(shared_data):
    first = downstream_tasks(1, root=shared_data, max_train=2000, max_test=300, seed=0)[0]
    second = downstream_tasks(1, root=shared_data, max_train=2000, max_test=300, seed=1)[0]
    assert first.test != second.test  # different subsets ...
    assert not set(second.test) & set(first.train)  # ... of one fixed held-out split


@pytest.fixture
def tiny_root(tmp_path, write_labelled):
    """A data root with the four tasks of orders 1-3 (and the yahoo substitute), 6 + 3 examples each."""
    for task in ("amazon", "agnews", "QQP", "MNLI"):
        labels = {"amazon": ["bad", "good"], "agnews": ["World", "Sports"], "QQP": ["False", "True"],
                  "MNLI": ["entailment", "neutral"]}[task]
        folder = tmp_path / "cl_benchmark" / task
        for split, count in (("train", 6), ("test", 3)):
            write_labelled(folder / f"{split}.json", [(f"{task} {split} {i}\n", labels[i % 2]) for i in range(count)],
                           labels=labels)
    write_labelled(tmp_path / "dbpedia14" / "test.json",
                   [(f"Title: T{i}\nText: abstract {i}", ["Company", "Film"][i % 2]) for i in range(10)],
                   labels=["Company", "Film"])
    return tmp_path


def test_generated_data_templates_subsets_and_substitute(tiny_root):
    tasks = downstream_tasks(2, root=tiny_root, max_train=4, max_test=None, seed=3, yahoo_substitute="MNLI")
    assert [task.name for task in tasks] == ["dbpedia", "amazon", "agnews", "mnli (yahoo substitute)"]
    assert [len(task.train) for task in tasks] == [4, 4, 4, 4]
    assert [len(task.test) for task in tasks] == [2, 3, 3, 3]
    assert tasks[3].template == DOWNSTREAM_TASKS["mnli"].template
    assert tasks[2].prompt("agnews test 0") == "What is the topic of this news article?\nagnews test 0\nTopic:"
    assert all(text.startswith("agnews train") and not text.endswith("\n") for text, _ in tasks[2].train)
    again = downstream_tasks(2, root=tiny_root, max_train=4, max_test=None, seed=3, yahoo_substitute="MNLI")
    assert [t.train for t in again] == [t.train for t in tasks]


def test_clear_errors(tiny_root):
    with pytest.raises(ValueError, match="unknown downstream order 7"):
        downstream_tasks(7, root=tiny_root)
    with pytest.raises(ValueError, match="yahoo_substitute"):
        downstream_tasks(1, root=tiny_root, yahoo_substitute="agnews")  # already in the order
    with pytest.raises(ValueError, match="max_train"):
        downstream_tasks(1, root=tiny_root, max_train=0)
    with pytest.raises(FileNotFoundError, match="cl_benchmark/CB/train.json"):
        downstream_tasks("long_mixed", root=tiny_root)
    (tiny_root / "cl_benchmark" / "agnews" / "test.json").write_text("[]")
    with pytest.raises(ValueError, match="agnews/test.json: no records"):
        downstream_tasks(1, root=tiny_root)
    (tiny_root / "cl_benchmark" / "agnews" / "test.json").write_text(json.dumps([{"label": "-", "sentence": "x"}]))
    with pytest.raises(ValueError, match="no labelled examples"):
        downstream_tasks(1, root=tiny_root)


def test_protocol_streams_keep_test_validation_and_development_items_apart(shared_data):
    reported = downstream_tasks(1, root=shared_data, max_train=160, max_test=500, seed=3, development_items=200)
    development = downstream_tasks(1, root=shared_data, max_train=None, max_test=None, seed=0,
                                   development_items=200, development=True)
    for report, develop in zip(reported, development):
        assert len(report.test) == 500 and (len(develop.train), len(develop.test)) == (160, 40)
        assert not set(report.train) & set(report.test)  # training (and so replay) items are never tested
        assert not set(develop.train) & set(develop.test)  # validation items are carved out of training items
        assert not (set(develop.train) | set(develop.test)) & (set(report.train) | set(report.test))
    # another data seed draws other reported items, never a development one
    other = downstream_tasks(1, root=shared_data, max_train=None, max_test=None, seed=1, development_items=200)
    assert not any(set(task.train) & (set(d.train) | set(d.test)) for task, d in zip(other, development))


def test_development_items_errors(tiny_root):
    with pytest.raises(ValueError, match="development_items=6 leaves none of amazon's 6 items"):
        downstream_tasks(1, root=tiny_root, development_items=6)
    with pytest.raises(ValueError, match="development_items must be >= 0 \\(>= 2 with development=True\\), got 0"):
        downstream_tasks(1, root=tiny_root, development=True)
