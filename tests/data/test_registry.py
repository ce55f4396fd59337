"""The task-loader registry: what a config may name as ``data.loader``."""

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from metakv_cl.data import TaskStream, TextTask, get_loader, register_loader, registered_loaders
from metakv_cl.data import registry

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _loader_names(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("loader", "warmup_loader") and isinstance(value, str):
                yield value
            else:
                yield from _loader_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from _loader_names(item)


def test_every_shipped_config_names_a_registered_loader():
    names = {name for path in CONFIGS.rglob("*.yaml") for name in _loader_names(yaml.safe_load(path.read_text()))}
    assert "metakv_cl.data.dbpedia.dbpedia_topic_tasks" in names  # the configs' dotted paths keep working
    for name in names:
        get_loader(name)


def test_project_loaders_are_registered_by_name_and_path():
    from metakv_cl.data.synthetic import synthetic_topic_tasks

    assert {"synthetic_topic_tasks", "dbpedia_topic_tasks", "downstream_tasks", "wikitext_tasks",
            "tasks_from_wikipedia_dump"} <= set(registered_loaders())
    for name in ("synthetic_topic_tasks", "metakv_cl.data.synthetic.synthetic_topic_tasks",
                 "metakv_cl.data.synthetic_topic_tasks"):  # by name, defining module, or package re-export
        assert get_loader(name) is synthetic_topic_tasks


def test_a_user_loader_registered_in_python_feeds_a_stream(monkeypatch):
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))

    @register_loader(name="user_tasks")
    def tasks(count: int = 2):
        return [TextTask(f"t{i}", train=["a b c"], test=["a b"]) for i in range(count)]

    stream = TaskStream(loader="user_tasks", loader_args={"count": 3}, tokenizer="word-level")
    assert [task.name for task in stream.tasks()] == ["t0", "t1", "t2"]


def test_an_installed_package_registers_a_loader_by_entry_point(monkeypatch):
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))
    entry = EntryPoint("package_tasks", "metakv_cl.data.wikitext:wikitext_tasks", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry] if group == registry.ENTRY_POINT_GROUP else [])
    registry._load_entry_points.cache_clear()
    try:
        assert get_loader("package_tasks") is get_loader("wikitext_tasks")
    finally:
        registry._load_entry_points.cache_clear()


def test_a_loader_must_return_tasks(monkeypatch):
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))
    register_loader(lambda: "not tasks", name="bad_loader")
    with pytest.raises(ValueError, match="loader bad_loader returned str, not a list of TextTask"):
        TaskStream(loader="bad_loader").tasks()


def test_a_broken_entry_point_is_named(monkeypatch):
    entry = EntryPoint("broken_tasks", "metakv_cl.data.nowhere:tasks", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry])
    registry._load_entry_points.cache_clear()
    try:
        with pytest.raises(ValueError, match="entry point 'broken_tasks' .*metakv_cl.data.nowhere:tasks.* cannot load"):
            get_loader("broken_tasks")
    finally:
        registry._load_entry_points.cache_clear()
