"""Bad input is refused with one clear message naming the key, file or value (issue 14, part 6).

Four classes of cases:

* ``CLI``: command-line arguments to ``metakv-cl``, run in-process; the error must be one
  ``metakv-cl: error:`` line on stderr, without a traceback, with a non-zero exit;
* ``YAML``: config files given to ``metakv-cl`` (same contract);
* ``API``: the Python API (MetaKVConfig, tasks, the training module, strategies, streams,
  saving and loading Meta-KV weights, model loading);
* ``LOADER``: every data loader fed damaged or wrong files.

Every case names the substrings its message must contain. Imports happen inside the cases so
that the battery also runs (and counts its failures) against code that lacks newer names.
"""

from __future__ import annotations

import bz2
import importlib
import json
import math
import time
from pathlib import Path

import pytest
import yaml

from metakv_cl.training.testing import single_torch_thread, toy_config

NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield


# --------------------------------------------------------------------------- CLI and YAML


def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def _loader_stream(config: dict, loader: str, **loader_args) -> None:
    data = config["data"]["init_args"]
    del data["tasks"]
    data.update(loader=loader, loader_args=loader_args)


def _pretrained(config: dict, model: str) -> None:
    config["model"]["init_args"] = {"model": model}
    config["data"]["init_args"]["tokenizer"] = "gpt2"  # a pretrained model keeps its tokenizer's vocabulary


def _classification_tasks(config: dict, train) -> None:
    config["data"]["init_args"]["tasks"] = [
        {"name": "t", "labels": ["yes", "no"], "train": train, "test": [["some text", "yes"]]}
    ]


# (id, edit of the toy config or None, extra arguments, command, substrings of the error line)
CONFIG_CASES = [
    ("yaml-train-mb-size-0", lambda c: _set(c, "strategy.init_args.train_mb_size", 0), [], "fit",
     ["train_mb_size", "0", "integer >= 1"]),
    ("yaml-eval-mb-size-negative", lambda c: _set(c, "strategy.init_args.eval_mb_size", -4), [], "fit",
     ["eval_mb_size", "-4", "integer >= 1"]),
    ("yaml-meta-kv-source", lambda c: _set(c, "model.init_args.meta_kv", {"source": "bogus"}), [], "fit",
     ["meta_kv.source", "'bogus'", "consolidated"]),
    ("yaml-meta-kv-rank-0", lambda c: _set(c, "model.init_args.meta_kv", {"rank": 0}), [], "fit",
     ["meta_kv.rank", "got 0"]),
    ("yaml-meta-kv-rank-above-head-dim", lambda c: _set(c, "model.init_args.meta_kv", {"rank": 9}), [], "fit",
     ["meta_kv.rank", "rank 9", "head dimension 8"]),
    ("yaml-meta-kv-form", lambda c: _set(c, "model.init_args.meta_kv", {"form": "dense"}), [], "fit",
     ["meta_kv.form", "'dense'", "hypernetwork"]),
    ("yaml-meta-kv-alpha-nan", lambda c: _set(c, "model.init_args.meta_kv", {"alpha": NAN}), [], "fit",
     ["alpha", "nan", "finite"]),
    ("yaml-meta-kv-score-bound-nan", lambda c: _set(c, "model.init_args.meta_kv", {"attentive_score_bound": NAN}),
     [], "fit", ["attentive_score_bound", "nan"]),
    ("yaml-lr-nan", lambda c: _set(c, "model.init_args.lr", NAN), [], "fit", ["lr", "nan", "finite"]),
    ("yaml-lr-inf", lambda c: _set(c, "model.init_args.lr", math.inf), [], "fit", ["lr", "inf", "finite"]),
    ("yaml-lr-negative", lambda c: _set(c, "model.init_args.lr", -0.1), [], "fit", ["lr", "-0.1", "positive"]),
    ("yaml-lr-not-a-number", lambda c: _set(c, "model.init_args.lr", "fast"), [], "fit", ["lr", "fast", "float"]),
    ("yaml-weight-decay-negative", lambda c: _set(c, "model.init_args.weight_decay", -1.0), [], "fit",
     ["weight_decay", "-1.0"]),
    ("yaml-lr-schedule", lambda c: _set(c, "model.init_args.lr_schedule", "step"), [], "fit",
     ["lr_schedule", "step"]),
    ("yaml-ranking", lambda c: _set(c, "model.init_args.ranking", "max"), [], "fit", ["ranking", "max"]),
    ("yaml-dtype", lambda c: _set(c, "model.init_args.dtype", "float8"), [], "fit", ["dtype", "float8"]),
    ("yaml-config-override-unknown", lambda c: _set(c, "model.init_args.config_overrides.n_layerz", 2), [], "fit",
     ["config_overrides", "n_layerz"]),
    ("yaml-missing-model-path", lambda c: _pretrained(c, "/nonexistent/models/mine"), [], "fit",
     ["/nonexistent/models/mine", "not found"]),
    ("yaml-ewc-lambda-nan", lambda c: _set(c, "strategy", {"class_path": "metakv_cl.strategies.EWC",
                                                           "init_args": {"ewc_lambda": NAN}}), [], "fit",
     ["ewc_lambda", "nan"]),
    ("yaml-lwf-temperature-zero", lambda c: _set(c, "strategy", {"class_path": "metakv_cl.strategies.LwF",
                                                                 "init_args": {"temperature": 0.0}}), [], "fit",
     ["temperature", "0.0"]),
    ("yaml-unknown-strategy", lambda c: _set(c, "strategy", {"class_path": "metakv_cl.strategies.SGD"}), [], "fit",
     ["metakv_cl.strategies.SGD", "known strategies", "metakv_cl.strategies.Naive"]),
    ("yaml-strategy-argument-it-lacks", lambda c: _set(c, "strategy.init_args.ewc_lambda", 3.0), [], "fit",
     ["ewc_lambda"]),
    ("yaml-unknown-trainer-key", lambda c: _set(c, "trainer.max_epoch", 2), [], "fit", ["trainer.max_epoch"]),
    ("yaml-max-epochs-zero", lambda c: _set(c, "trainer.max_epochs", 0), [], "fit", ["trainer.max_epochs", "0"]),
    ("yaml-max-steps-zero", lambda c: _set(c, "trainer.max_steps", 0), [], "fit", ["trainer.max_steps", "0"]),
    ("yaml-limit-train-batches-zero", lambda c: _set(c, "trainer.limit_train_batches", 0), [], "fit",
     ["trainer.limit_train_batches", "0"]),
    ("yaml-max-length-zero", lambda c: _set(c, "data.init_args.max_length", 0), [], "fit", ["max_length", "got 0"]),
    ("yaml-overflow", lambda c: _set(c, "data.init_args.overflow", "wrap"), [], "fit", ["overflow", "wrap"]),
    ("yaml-warmup-epochs-zero", lambda c: c["data"]["init_args"].update(warmup_experiences=1, warmup_epochs=0), [],
     "fit", ["warmup_epochs", "got 0"]),
    ("yaml-loader-os-system", lambda c: _loader_stream(c, "os.system", command="true"), [], "fit",
     ["'os.system' is not a registered task loader", "synthetic_topic_tasks"]),
    ("yaml-loader-builtins-eval", lambda c: _loader_stream(c, "builtins.eval", source="1"), [], "fit",
     ["'builtins.eval' is not a registered task loader"]),
    ("yaml-loader-subprocess-run", lambda c: _loader_stream(c, "subprocess.run", args=["true"]), [], "fit",
     ["'subprocess.run' is not a registered task loader"]),
    ("yaml-warmup-loader-os-system", lambda c: c["data"]["init_args"].update(
        warmup_loader="os.system", warmup_loader_args={"command": "true"}), [], "fit",
     ["warmup_loader", "'os.system' is not a registered task loader"]),
    ("yaml-loader-args-misfit", lambda c: _loader_stream(c, "synthetic_topic_tasks", topics_count=2), [], "fit",
     ["topics_count", "accepted arguments"]),
    ("yaml-loader-data-missing", lambda c: _loader_stream(c, "metakv_cl.data.dbpedia.dbpedia_topic_tasks",
                                                          root="/nonexistent/dbpedia14"), [], "fit",
     ["/nonexistent/dbpedia14/test.json", "not found"]),
    ("yaml-inline-task-split-is-a-string", lambda c: c["data"]["init_args"]["tasks"][0].update(train="a string"),
     [], "fit", ["train must be a list", "'a string'"]),
    ("yaml-inline-label-null", lambda c: _classification_tasks(c, [["some text", None]]), [], "fit",
     ["train[0]", "None"]),
    ("yaml-inline-task-unknown-key", lambda c: c["data"]["init_args"]["tasks"][0].update(texts=["x"]), [], "fit",
     ["tasks[0]", "texts"]),
    ("yaml-torch-threads-zero", lambda c: _set(c, "torch_num_threads", 0), [], "fit", ["torch_num_threads", "0"]),
    ("yaml-compare-no-strategies", None, [], "compare", ["strategies"]),
    ("cli-max-epochs-zero", None, ["--trainer.max_epochs", "0"], "fit", ["trainer.max_epochs", "0"]),
    ("cli-lr-nan", None, ["--model.init_args.lr", "nan"], "fit", ["lr", "nan"]),
    ("cli-max-length-zero", None, ["--data.init_args.max_length", "0"], "fit", ["max_length", "got 0"]),
    ("cli-loader-os-system", None, ["--data.init_args.tasks", "null", "--data.init_args.loader", "os.system"], "fit",
     ["'os.system' is not a registered task loader"]),
    ("cli-unknown-option", None, ["--trainer.max_epochz", "2"], "fit", ["max_epochz"]),
    ("cli-ckpt-path-not-last", None, ["--ckpt_path", "model.ckpt"], "fit", ["--ckpt_path last", "model.ckpt"]),
    ("cli-validate-missing-checkpoint", None, ["--ckpt_path", "/nonexistent/model.ckpt"], "validate",
     ["/nonexistent/model.ckpt"]),
    ("cli-missing-config-file", None, ["--config", "/nonexistent/config.yaml"], "fit", ["/nonexistent/config.yaml"]),
]


@pytest.mark.parametrize("case_id, edit, extra, command, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_cli_and_yaml(case_id, edit, extra, command, expected, tmp_path, cli_error):
    config = toy_config(tmp_path / "run")
    if command == "compare":
        del config["strategy"]
        config["strategies"] = []
    if edit is not None:
        edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    line = cli_error([command, "--config", str(path), *extra])
    for text in expected:
        assert text in line, line
    assert not (tmp_path / "run" / "report.json").exists()  # nothing was trained


@pytest.mark.parametrize("content, expected", [
    (b"trainer: {max_epochs: 2\nmodel: [\n", "malformed YAML at line 2"),
    (b"trainer:\n  default_root_dir: caf\xe9\n", "utf-8"),
], ids=["malformed", "not-utf8"])
def test_yaml_damaged_config_names_the_file(content, expected, tmp_path, cli_error):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    line = cli_error(["fit", "--config", str(path)])
    assert "broken.yaml" in line and expected in line, line


def test_cli_debug_shows_the_traceback(tmp_path):
    from metakv_cl.cli import main

    config = toy_config(tmp_path / "run")
    _set(config, "model.init_args.meta_kv", {"rank": 0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match="meta_kv.rank") as error:  # --debug: the exception itself, traceback and all
        main(["fit", "--config", str(path), "--debug"])
    assert not isinstance(error.value, SystemExit)


def test_a_config_loader_never_runs_a_command(tmp_path, cli_error):
    marker = tmp_path / "ran"
    config = toy_config(tmp_path / "run")
    _loader_stream(config, "os.system", command=f"touch {marker}")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert "not a registered task loader" in cli_error(["fit", "--config", str(path)])
    assert not marker.exists()


# --------------------------------------------------------------------------- Python API


def _meta_kv_config(**values):
    from metakv_cl.modeling import MetaKVConfig

    return MetaKVConfig(**values)


def _text_task(*args, **kwargs):
    from metakv_cl.data import TextTask

    return TextTask(*args, **kwargs)


def _classification_task(train, labels=("yes", "no"), **kwargs):
    from metakv_cl.data import ClassificationTask

    return ClassificationTask("c", train=train, test=[("text", "yes")], labels=labels, **kwargs)


def _module(**kwargs):
    from metakv_cl.testing import tiny_gpt2
    from metakv_cl.training.module import ContinualLMModule

    return ContinualLMModule(tiny_gpt2(), **kwargs)


def _strategy(name, **kwargs):
    import metakv_cl.strategies as strategies

    return getattr(strategies, name)(module=_module(), **kwargs)


def _stream(**kwargs):
    from metakv_cl.data import TaskStream

    return TaskStream(**kwargs).tasks()


def _add_meta_kv(rank):
    from metakv_cl.modeling import MetaKVConfig, add_meta_kv
    from metakv_cl.testing import tiny_gpt2

    return add_meta_kv(tiny_gpt2(), MetaKVConfig(rank=rank))  # head dimension 64 / 4 = 16


def _saved_meta_kv(tmp_path, factory="tiny_gpt2"):
    import metakv_cl.testing as testing
    from metakv_cl.modeling import MetaKVConfig, add_meta_kv, save_meta_kv

    model = add_meta_kv(getattr(testing, factory)(), MetaKVConfig(source="mean", rank=4))
    testing.randomize_meta_kv(model)
    return save_meta_kv(model, tmp_path / "saved")


def _load_meta_kv(directory, factory="tiny_gpt2", **overrides):
    import metakv_cl.testing as testing
    from metakv_cl.modeling import load_meta_kv

    return load_meta_kv(getattr(testing, factory)(**overrides), directory)


def _flipped_weights(tmp_path):
    directory = _saved_meta_kv(tmp_path)
    weights = directory / "meta_kv.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte, not the header: the file still parses
    weights.write_bytes(bytes(data))
    _load_meta_kv(directory)


def _gpt2_weights_into_llama(tmp_path):
    # a Llama with as many KV heads as query heads has the GPT-2's Meta-KV shapes
    _load_meta_kv(_saved_meta_kv(tmp_path), "tiny_llama", num_key_value_heads=4)


def _damaged_meta_kv_config(tmp_path, content: bytes):
    directory = _saved_meta_kv(tmp_path)
    (directory / "meta_kv_config.json").write_bytes(content)
    _load_meta_kv(directory)


def _truncated_gguf(tmp_path):
    from metakv_cl.hub import load_causal_lm

    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    load_causal_lm(str(tmp_path), gguf_file="model.gguf")


def _register_twice(tmp_path):
    from metakv_cl.data import register_loader

    register_loader(lambda: [], name="synthetic_topic_tasks")


def _loader_os_system_ran_nothing(tmp_path):
    marker = tmp_path / "ran"
    try:
        _stream(loader="os.system", loader_args={"command": f"touch {marker}"})
    finally:
        assert not marker.exists(), "the command ran"


# (id, call taking tmp_path, exception types, substrings of the message)
API_CASES = [
    ("meta-kv-config-source", lambda p: _meta_kv_config(source="average"), ValueError, ["source", "'average'", "mean"]),
    ("meta-kv-config-hybrid-dynamic", lambda p: _meta_kv_config(source="hybrid", hybrid_dynamic="consolidated"),
     ValueError, ["hybrid_dynamic", "'consolidated'"]),
    ("meta-kv-config-core", lambda p: _meta_kv_config(core="diag"), ValueError, ["core", "'diag'", "gate"]),
    ("meta-kv-config-rank-0", lambda p: _meta_kv_config(rank=0), ValueError, ["rank", "0"]),
    ("meta-kv-config-rank-float", lambda p: _meta_kv_config(rank=2.5), ValueError, ["rank", "2.5"]),
    ("meta-kv-config-alpha-nan", lambda p: _meta_kv_config(alpha=NAN), ValueError, ["alpha", "nan"]),
    ("meta-kv-config-score-bound-nan", lambda p: _meta_kv_config(attentive_score_bound=NAN), ValueError,
     ["attentive_score_bound", "nan"]),
    ("meta-kv-config-unknown-key",
     lambda p: importlib.import_module("metakv_cl.modeling").MetaKVConfig.from_dict({"rnak": 4}), ValueError, ["rnak"]),
    ("add-meta-kv-rank-above-head-dim", lambda p: _add_meta_kv(17), ValueError, ["rank 17", "head dimension 16"]),
    ("text-task-split-is-a-string", lambda p: _text_task("t", "a string", ["x"]), ValueError,
     ["train must be a list", "'a string'"]),
    ("text-task-text-is-none", lambda p: _text_task("t", ["fine", None], ["x"]), ValueError, ["train[1]", "None"]),
    ("text-task-empty-test", lambda p: _text_task("t", ["x"], []), ValueError, ["test split is empty"]),
    ("text-task-no-name", lambda p: _text_task("", ["x"], ["y"]), ValueError, ["task name", "''"]),
    ("classification-label-none", lambda p: _classification_task([("text", None)]), ValueError, ["train[0]", "None"]),
    ("classification-labels-string", lambda p: _classification_task([("text", "y")], labels="yn"), ValueError,
     ["labels must be a list of strings", "'yn'"]),
    ("classification-pair-is-a-string", lambda p: _classification_task(["text"]), ValueError,
     ["train[0]", "(text, label) pair"]),
    ("classification-template", lambda p: _classification_task([("t", "yes")], template="Answer:"), ValueError,
     ["template", "{text}"]),
    ("module-lr-nan", lambda p: _module(lr=NAN), ValueError, ["lr", "nan"]),
    ("module-ranking", lambda p: _module(ranking="max"), ValueError, ["ranking", "'max'", "sum, mean"]),
    ("module-weight-decay-nan", lambda p: _module(weight_decay=NAN), ValueError, ["weight_decay", "nan"]),
    ("module-betas", lambda p: _module(betas=(1.0, 0.9)), ValueError, ["betas", "(1.0, 0.9)"]),
    ("ewc-lambda-nan", lambda p: _strategy("EWC", ewc_lambda=NAN), ValueError, ["ewc_lambda", "nan"]),
    ("lwf-alpha-nan", lambda p: _strategy("LwF", alpha=NAN), ValueError, ["alpha", "nan"]),
    ("stream-max-length-zero", lambda p: _stream(max_length=0), ValueError, ["max_length", "got 0"]),
    ("stream-loader-os-system", _loader_os_system_ran_nothing, ValueError,
     ["'os.system' is not a registered task loader", "synthetic_topic_tasks", "register_loader"]),
    ("stream-loader-builtins-eval", lambda p: _stream(loader="builtins.eval", loader_args={"source": "1"}), ValueError,
     ["'builtins.eval' is not a registered task loader"]),
    ("stream-warmup-loader-subprocess", lambda p: _stream(warmup_loader="subprocess.run",
                                                          warmup_loader_args={"args": ["true"]}), ValueError,
     ["warmup_loader", "'subprocess.run' is not a registered task loader"]),
    ("stream-loader-unregistered-project-function", lambda p: _stream(loader="metakv_cl.data.stream.make_benchmark"),
     ValueError, ["'metakv_cl.data.stream.make_benchmark' is not a registered task loader"]),
    ("stream-loader-not-a-string", lambda p: _stream(loader=print), ValueError, ["loader", "builtin_function"]),
    ("stream-inline-task-not-a-mapping", lambda p: _stream(tasks=["cooking"]), ValueError, ["tasks[0]", "'cooking'"]),
    ("stream-inline-tasks-empty", lambda p: _stream(tasks=[]), ValueError, ["tasks", "empty"]),
    ("register-loader-name-taken", _register_twice, ValueError, ["synthetic_topic_tasks", "taken"]),
    ("meta-kv-flipped-weight-bytes", _flipped_weights, ValueError, ["meta_kv.safetensors", "sha256"]),
    ("meta-kv-gpt2-weights-into-llama", _gpt2_weights_into_llama, ValueError, ["'gpt2'", "'llama'"]),
    ("meta-kv-config-malformed-json", lambda p: _damaged_meta_kv_config(p, b'{"meta_kv": {'), ValueError,
     ["meta_kv_config.json", "malformed JSON", "line 1"]),
    ("meta-kv-config-not-utf8", lambda p: _damaged_meta_kv_config(p, b'{"source": "\xff"}'), ValueError,
     ["meta_kv_config.json", "utf-8"]),
    ("model-missing-local-path", lambda p: importlib.import_module("metakv_cl.hub").load_causal_lm(
        str(p / "no" / "model")), FileNotFoundError, ["no/model", "not found"]),
    ("tokenizer-missing-local-path", lambda p: importlib.import_module("metakv_cl.hub").load_tokenizer(
        "./no/tokenizer"), FileNotFoundError, ["./no/tokenizer", "not found"]),
    ("model-truncated-gguf", _truncated_gguf, ValueError, ["model.gguf"]),
]


@pytest.mark.parametrize("case_id, call, error_types, expected", API_CASES, ids=[c[0] for c in API_CASES])
def test_api(case_id, call, error_types, expected, tmp_path):
    with pytest.raises(error_types) as error:
        call(tmp_path)
    message = str(error.value)
    assert "\n" not in message.strip(), message
    for text in expected:
        assert text in message, message


# --------------------------------------------------------------------------- loaders

NOT_UTF8 = b"caf\xe9 au lait\n"


def _labelled(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def _read_labelled(tmp_path, content):
    from metakv_cl.data.dbpedia import read_labelled_json

    return read_labelled_json(_labelled(tmp_path / "data.json", content))


def _downstream(tmp_path, labels):
    from metakv_cl.data import downstream_tasks

    folder = tmp_path / "cl_benchmark" / "agnews"
    for split in ("train", "test"):
        _labelled(folder / f"{split}.json", [{"label": "World", "sentence": "news"}] * 2)
    _labelled(folder / "labels.json", labels)
    _labelled(tmp_path / "dbpedia14" / "test.json", [{"label": "Company", "sentence": "Title: A\nText: b"}] * 10)
    for name in ("amazon", "QQP"):
        for split in ("train", "test"):
            _labelled(tmp_path / "cl_benchmark" / name / f"{split}.json", [{"label": "x", "sentence": "s"}] * 2)
        _labelled(tmp_path / "cl_benchmark" / name / "labels.json", ["x", "y"])
    _labelled(tmp_path / "dbpedia14" / "labels.json", ["Company", "Artist"])
    return downstream_tasks(order=1, root=tmp_path)


def _wikitext(tmp_path, content: bytes):
    from metakv_cl.data import wikitext_tasks

    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_bytes(content)
    return wikitext_tasks(root=tmp_path)


def _text_files(tmp_path, content: bytes, **kwargs):
    from metakv_cl.data import text_task_from_files

    (tmp_path / "train.txt").write_bytes(content)
    (tmp_path / "test.txt").write_text("held out\n")
    return text_task_from_files("files", tmp_path / "train.txt", tmp_path / "test.txt", **kwargs)


_PAGE = ("<page><title>A</title><ns>0</ns><revision><text>'''A''' is a test article about rivers and lakes. "
         + "It flows. " * 30 + "[[Category:Rivers]]</text></revision></page>")
_DUMP = f"<mediawiki><siteinfo><sitename>W</sitename></siteinfo>{_PAGE * 3}</mediawiki>"


def _dump(tmp_path, name: str, content: bytes):
    from metakv_cl.data import tasks_from_wikipedia_dump

    (tmp_path / name).write_bytes(content)
    return tasks_from_wikipedia_dump(tmp_path / name, {"rivers": ["Rivers"]})


def _hf_classification(rows, **kwargs):
    from metakv_cl.data import classification_task_from_hf_dataset

    good = [{"text": "fine", "label": "yes"}, {"text": "also fine", "label": "no"}]
    return classification_task_from_hf_dataset("hf", {"train": rows, "test": good}, "text", "label", **kwargs)


def _hf_text(rows):
    from metakv_cl.data import text_task_from_hf_dataset

    return text_task_from_hf_dataset("hf", {"train": rows, "test": [{"text": "fine"}]})


def _dbpedia(tmp_path, content):
    from metakv_cl.data import dbpedia_topic_tasks

    _labelled(tmp_path / "test.json", content)
    return dbpedia_topic_tasks(root=tmp_path)


def _synthetic(**kwargs):
    from metakv_cl.data import synthetic_topic_tasks

    return synthetic_topic_tasks(**kwargs)


LOADER_CASES = [
    ("labelled-json-not-utf8", lambda p: _read_labelled(p, NOT_UTF8), ValueError, ["data.json", "utf-8"]),
    ("labelled-json-malformed", lambda p: _read_labelled(p, b'[{"label": "a", "sentence": '), ValueError,
     ["data.json", "malformed JSON", "line 1"]),
    ("labelled-json-label-null", lambda p: _read_labelled(p, [{"label": None, "sentence": "s"}]), ValueError,
     ["data.json", "record 0", "label", "None"]),
    ("labelled-json-label-number", lambda p: _read_labelled(p, [{"label": 3, "sentence": "s"}]), ValueError,
     ["data.json", "record 0", "label", "3"]),
    ("labelled-json-sentence-null", lambda p: _read_labelled(p, [{"label": "a", "sentence": None}]), ValueError,
     ["data.json", "record 0", "sentence"]),
    ("labelled-json-not-a-list", lambda p: _read_labelled(p, {"label": "a"}), ValueError, ["data.json", "JSON list"]),
    ("dbpedia-malformed-json", lambda p: _dbpedia(p, b"[{"), ValueError, ["test.json", "malformed JSON"]),
    ("dbpedia-missing", lambda p: importlib.import_module("metakv_cl.data").dbpedia_topic_tasks(root=p / "none"),
     FileNotFoundError, ["none/test.json"]),
    ("downstream-labels-malformed", lambda p: _downstream(p, b'["World", '), ValueError,
     ["labels.json", "malformed JSON"]),
    ("downstream-labels-not-strings", lambda p: _downstream(p, ["World", None]), ValueError,
     ["labels.json", "label strings"]),
    ("downstream-order", lambda p: importlib.import_module("metakv_cl.data").downstream_tasks(order=7, root=p),
     ValueError, ["order 7", "long_mixed"]),
    ("wikitext-not-utf8", lambda p: _wikitext(p, NOT_UTF8 * 3), ValueError, ["valid.txt", "utf-8"]),
    ("text-files-not-utf8", lambda p: _text_files(p, NOT_UTF8), ValueError, ["train.txt", "utf-8"]),
    ("text-files-unknown-encoding", lambda p: _text_files(p, b"text\n", encoding="utf-9"), ValueError,
     ["train.txt", "utf-9"]),
    ("text-files-unit", lambda p: _text_files(p, b"text\n", unit="word"), ValueError, ["unit", "'word'"]),
    ("wikipedia-dump-malformed-xml", lambda p: _dump(p, "dump.xml", _DUMP[:-30].encode() + b"<page><tit"), ValueError,
     ["dump.xml", "XML"]),
    ("wikipedia-dump-not-utf8", lambda p: _dump(p, "dump.xml", _DUMP.replace("It flows.", "caf\xe9").encode("latin-1")),
     ValueError, ["dump.xml"]),
    ("wikipedia-dump-truncated-bz2", lambda p: _dump(p, "dump.xml.bz2", bz2.compress(_DUMP.encode() * 20)[:-200]),
     ValueError, ["dump.xml.bz2"]),
    ("wikipedia-dump-not-bz2", lambda p: _dump(p, "dump.xml.bz2", _DUMP.encode()), ValueError, ["dump.xml.bz2"]),
    ("wikipedia-dump-missing", lambda p: importlib.import_module("metakv_cl.data").tasks_from_wikipedia_dump(
        p / "none.xml", {"r": ["R"]}), FileNotFoundError, ["none.xml"]),
    ("hf-classification-label-none", lambda p: _hf_classification([{"text": "t", "label": None}]), ValueError,
     ["row 0", "'label'", "None"]),
    ("hf-classification-text-none", lambda p: _hf_classification([{"text": None, "label": "yes"}]), ValueError,
     ["row 0", "'text'", "None"]),
    ("hf-classification-label-id-out-of-range", lambda p: _hf_classification(
        [{"text": "t", "label": 5}], label_names=["yes", "no"]), ValueError, ["row 0", "label id 5"]),
    ("hf-text-none", lambda p: _hf_text([{"text": "fine"}, {"text": None}]), ValueError, ["row 1", "'text'", "None"]),
    ("hf-missing-column", lambda p: _hf_text([{"body": "x"}]), KeyError, ["text", "body"]),
    ("synthetic-unknown-topic", lambda p: _synthetic(topics=["cities", "moons"], num_experiences=2), KeyError,
     ["moons", "cities"]),
    ("synthetic-too-many-experiences", lambda p: _synthetic(num_experiences=9), ValueError, ["num_experiences", "9"]),
]


@pytest.mark.parametrize("case_id, call, error_types, expected", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_loaders(case_id, call, error_types, expected, tmp_path):
    with pytest.raises(error_types) as error:
        call(tmp_path)
    message = str(error.value.args[0]) if isinstance(error.value, KeyError) else str(error.value)
    assert "\n" not in message.strip(), message
    for text in expected:
        assert text in message, message


def test_wikipedia_dump_stripping_is_linear_in_nested_templates():
    from metakv_cl.data.wikipedia_dump import strip_wikitext

    depth = 27_000  # about 160 kB: one pass per nesting level took 45 s here
    text = "Prose. " + "{{t|" * depth + "}}" * depth + " More prose."
    started = time.perf_counter()
    assert strip_wikitext(text) == "Prose. More prose."
    assert time.perf_counter() - started < 5.0


def test_wikipedia_dump_keeps_no_finished_records(tmp_path, monkeypatch):
    """Non-page records (siteinfo, logs, ...) are freed as they end, not only when a page ends."""
    import xml.etree.ElementTree as ElementTree

    from metakv_cl.data.wikipedia_dump import iter_wikipedia_pages

    roots = []
    original = ElementTree.iterparse

    def recording_iterparse(*args, **kwargs):
        for event, element in original(*args, **kwargs):
            if not roots:
                roots.append(element)
            yield event, element

    monkeypatch.setattr(ElementTree, "iterparse", recording_iterparse)
    path = tmp_path / "dump.xml"
    path.write_text(f"<mediawiki>{_PAGE}" + "<logitem><comment>x</comment></logitem>" * 500 + "</mediawiki>")
    assert len(list(iter_wikipedia_pages(path))) == 1
    assert len(roots[0]) == 0
