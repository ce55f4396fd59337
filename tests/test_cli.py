"""The metakv-cl command line: fit / validate / compare / dispatch, overrides and config errors."""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from metakv_cl.cli import LIGHTNING_COMMANDS, main
from metakv_cl.training.testing import TOY_MODEL_SHAPE, single_torch_thread, toy_config, write_config


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield


def test_fit_runs_the_stream_prints_the_table_and_writes_the_report(tmp_path, capsys):
    root = tmp_path / "run"
    path = write_config(tmp_path, toy_config(root))
    main(["fit", "--config", path, "--trainer.max_epochs", "2"])
    out = capsys.readouterr().out
    assert "| method | score | average | forgetting | BWT | FWT |" in out and "| naive | loss |" in out
    report = json.loads((root / "report.json").read_text())
    method = report["methods"][0]
    assert method["method"] == "naive" and len(method["matrix"]) == 3
    assert {"average", "forgetting", "bwt", "fwt"} <= set(method["summary"])
    for name in ("report.md", "heatmap_naive.png", "curves_naive.png", "forgetting.png", "stream_state/state.safetensors"):
        assert (root / name).is_file(), name
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 2  # the override reached the run

    # validate with the finished run's model reproduces its last row
    main(["validate", "--config", path, "--ckpt_path", "last"])
    out = capsys.readouterr().out
    for j, score in enumerate(method["matrix"][-1]):
        assert f"| {score:.4f} |" in out.splitlines()[2 + j]

    # resuming a finished run trains nothing and reports the same figures
    main(["fit", "--config", path, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "trained" not in out.replace("(2/2 trained)", "")
    assert json.loads((root / "report.json").read_text())["methods"][0]["matrix"] == method["matrix"]


def test_print_config_shows_strategy_and_stream(tmp_path, capsys):
    path = write_config(tmp_path, toy_config(tmp_path / "run"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["strategy"]["class_path"] == "metakv_cl.strategies.Naive"
    assert printed["data"]["class_path"] == "metakv_cl.data.TaskStream"
    assert "vocab_size" not in printed["model"]["init_args"]  # linked from the stream


def test_the_scoring_options_are_model_init_args(tmp_path, capsys):
    config = toy_config(tmp_path / "run")
    config["model"]["init_args"].update(ranking="mean", exact_match=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", write_config(tmp_path, config), "--print_config"])
    assert exit_info.value.code == 0
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["ranking"] == "mean" and init_args["exact_match"] is True


def test_config_text_in_place_of_a_file_is_accepted(tmp_path, capsys):
    """LightningCLI takes ``--config`` as a path or as the config's own YAML/JSON text."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", json.dumps(toy_config(tmp_path / "run")), "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["strategy"]["class_path"] == "metakv_cl.strategies.Naive"


def test_a_config_key_that_does_not_exist_is_named(tmp_path, capsys):
    config = toy_config(tmp_path / "run")
    config["trainer"]["max_epoch"] = config["trainer"].pop("max_epochs")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", write_config(tmp_path, config)])
    assert exit_info.value.code != 0
    assert "max_epoch" in capsys.readouterr().err


def test_an_unknown_strategy_is_named(tmp_path, capsys):
    config = toy_config(tmp_path / "run", strategy={"class_path": "metakv_cl.strategies.SGD"})
    with pytest.raises(SystemExit):
        main(["fit", "--config", write_config(tmp_path, config)])
    assert "metakv_cl.strategies.SGD" in capsys.readouterr().err


def test_a_strategy_argument_it_does_not_take_is_named(tmp_path, capsys):
    path = write_config(tmp_path, toy_config(tmp_path / "run"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", path, "--strategy.init_args.ewc_lambda", "3"])
    assert "ewc_lambda" in capsys.readouterr().err


def test_fit_ckpt_path_must_be_last(tmp_path, cli_error):
    path = write_config(tmp_path, toy_config(tmp_path / "run"))
    assert "use --ckpt_path last" in cli_error(["fit", "--config", path, "--ckpt_path", "model.ckpt"])


def compare_config(root, strategies):
    config = toy_config(root)
    del config["strategy"]
    config["strategies"] = strategies
    config["strategy_defaults"] = {"train_mb_size": 8, "eval_mb_size": 16}
    return config


def test_compare_runs_every_strategy_into_one_report(tmp_path, capsys):
    root = tmp_path / "compare"
    config = compare_config(root, [
        {"class_path": "metakv_cl.strategies.Naive"},
        {"class_path": "metakv_cl.strategies.LoRA", "init_args": {"mode": "per_experience"}},
    ])
    main(["compare", "--config", write_config(tmp_path, config)])
    out = capsys.readouterr().out
    assert "| naive | loss |" in out and "| lora-per-experience | loss |" in out
    methods = json.loads((root / "report.json").read_text())["methods"]
    assert [m["method"] for m in methods] == ["naive", "lora-per-experience"]
    assert methods[0]["matrix"][0] == methods[1]["matrix"][0]  # same initial weights
    assert (root / "naive" / "stream_state" / "state.safetensors").is_file()


def test_compare_names_the_bad_entry_before_training(tmp_path, cli_error):
    config = compare_config(tmp_path / "compare", [
        {"class_path": "metakv_cl.strategies.Naive"},
        {"class_path": "metakv_cl.strategies.LoRA", "init_args": {"rnak": 4}},
    ])
    assert re.search(r"strategies\[1\] \(LoRA\).*rnak", cli_error(["compare", "--config", write_config(tmp_path, config)]))
    assert not (tmp_path / "compare" / "naive").exists()
    config["strategies"][1] = {"class_path": "metakv_cl.strategies.Adam"}
    assert "strategies[1]: unknown strategy 'metakv_cl.strategies.Adam'; known" in cli_error(
        ["compare", "--config", write_config(tmp_path, config)]
    )


def _parameter_count(meta_kv=None):
    """Parameters of the toy config's model (all trainable under Naive), with or without Meta-KV."""
    from metakv_cl.data import TaskStream
    from metakv_cl.modeling import MetaKVConfig
    from metakv_cl.training import ContinualLMModule

    data = toy_config("unused")["data"]["init_args"]
    module = ContinualLMModule(
        "gpt2", from_scratch=True, config_overrides=dict(TOY_MODEL_SHAPE), vocab_size=TaskStream(**data).vocab_size,
        meta_kv=MetaKVConfig(**meta_kv) if meta_kv else None,
    )
    return sum(p.numel() for p in module.parameters())


def test_compare_entries_train_their_own_modules_and_baselines_run_on_the_plain_model(tmp_path):
    root = tmp_path / "compare"
    config = compare_config(root, [
        {"class_path": "metakv_cl.strategies.Naive"},
        {"class_path": "metakv_cl.strategies.Naive", "init_args": {"name": "naive-metakv"},
         "model": {"lr": 0.01, "meta_kv": {"source": "consolidated", "rank": 4}}},
    ])
    config["model"]["init_args"]["meta_kv"] = {"source": "consolidated", "rank": 8}  # the shared model's
    main(["compare", "--config", write_config(tmp_path, config)])
    plain, metakv = (method["extra"] for method in json.loads((root / "report.json").read_text())["methods"])
    assert plain["module"]["meta_kv"] is None and plain["module"]["lr"] == 3e-3
    assert metakv["module"]["meta_kv"]["rank"] == 4 and metakv["module"]["lr"] == 0.01
    assert plain["trainable_params"] == _parameter_count()
    assert metakv["trainable_params"] == _parameter_count({"source": "consolidated", "rank": 4}) > _parameter_count()


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_a_meta_kv_strategy_in_compare_keeps_the_shared_meta_kv(tmp_path):
    from metakv_cl.lightning_cli import CompareCLI

    composed = {"class_path": "metakv_cl.strategies.ContinualStrategy", "init_args": {"plugins": [
        {"class_path": "metakv_cl.strategies.plugins.Replay"},
        {"class_path": "metakv_cl.strategies.plugins.MetaKVConsolidation"},
    ]}}
    config = compare_config(tmp_path / "compare", [
        {"class_path": "metakv_cl.strategies.MetaKVConsolidation"}, {"class_path": "metakv_cl.strategies.LoRA"}, composed,
    ])
    config["model"]["init_args"]["meta_kv"] = {"source": "consolidated", "rank": 8}
    cli = CompareCLI(args=["--config", write_config(tmp_path, config)])
    module_configs = [cli._plan(entry, {}, "entry")[2] for entry in config["strategies"]]
    assert module_configs[0].model.meta_kv.rank == 8 and module_configs[1].model.meta_kv is None
    assert module_configs[2].model.meta_kv.rank == 8  # the Meta-KV plugin keeps it too
    metakv, plain, composed = cli._modules(module_configs)
    assert metakv is cli.model is composed  # the shared model, not a rebuilt one
    shared = metakv.state_dict()
    assert all(torch.equal(value, shared[key]) for key, value in plain.state_dict().items())  # same base weights


@pytest.mark.parametrize("entry, message", [
    ({"model": {"lrr": 0.1}},
     "strategies[1].model: ContinualLMModule has no init arg 'lrr'; allowed: attn_implementation, betas, compile,"),
    ({"model": {"vocab_size": 9}}, "strategies[1].model: ContinualLMModule has no init arg 'vocab_size'"),
    ({"modle": {"lr": 0.1}}, "strategies[1]: unknown key 'modle'; an entry has class_path, init_args, model"),
    ({"model": {"lr": "fast"}}, "strategies[1].model: model.lr: Expected a float. Got value: fast"),
])
def test_compare_refuses_a_bad_module_override_naming_it(tmp_path, cli_error, entry, message):
    config = compare_config(tmp_path / "compare", [
        {"class_path": "metakv_cl.strategies.Naive"},
        {"class_path": "metakv_cl.strategies.EWC", **entry},
    ])
    error = cli_error(["compare", "--config", write_config(tmp_path, config)])
    assert message in error
    assert not (tmp_path / "compare" / "naive").exists()


@pytest.mark.parametrize("command, function", [("kv-eval", "main"), ("niah", "niah_main"), ("ruler", "ruler_main")])
def test_kv_commands_dispatch_to_the_kv_evaluator(command, function, monkeypatch):
    calls = []
    fake = types.ModuleType("metakv_cl.kv.evaluate")
    fake.main = lambda argv: calls.append(("main", argv)) or 0
    fake.niah_main = lambda argv: calls.append(("niah_main", argv)) or 3
    fake.ruler_main = lambda argv: calls.append(("ruler_main", argv)) or 4
    monkeypatch.setitem(sys.modules, "metakv_cl.kv.evaluate", fake)
    import metakv_cl.kv

    monkeypatch.setattr(metakv_cl.kv, "evaluate", fake, raising=False)
    status = main([command, "--model", "tiny", "--out-dir", "out"])
    assert calls == [(function, ["--model", "tiny", "--out-dir", "out"])]
    assert status == {"main": 0, "niah_main": 3, "ruler_main": 4}[function]


HEAVY_MODULES = ("torch", "pytorch_lightning", "avalanche", "transformers", "jsonargparse")


@pytest.mark.parametrize(
    "argv",
    [["--help"], [], ["train"], ["kv-eval", "--help"], ["niah", "--help"], ["ruler", "--help"]],
    ids=["help", "no-arguments", "unknown-command", "kv-eval-help", "niah-help", "ruler-help"],
)
def test_help_and_usage_errors_load_no_heavy_module(argv):
    """What makes `metakv-cl --help` answer at once: none of the stack is imported for it."""
    code = (
        "import sys\nfrom metakv_cl.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', sorted(set({HEAVY_MODULES!r}) & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: metakv-cl" in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "loaded: []"


def test_the_light_entry_point_knows_every_lightning_command():
    from metakv_cl.lightning_cli import ContinualCLI

    assert set(LIGHTNING_COMMANDS) == {*ContinualCLI.subcommands(), "compare"}


def test_unknown_command_and_help(capsys):
    main([])
    assert "compare" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    assert "unknown command 'train'" in capsys.readouterr().err


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


FIT_CONFIGS = [path for path in CONFIGS if "strategy" in yaml.safe_load(path.read_text())]


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)
def test_shipped_fit_configs_give_meta_kv_to_meta_kv_strategies_only(path):
    """As in compare, a baseline's `fit` runs on the plain model: its row matches the quickstart's."""
    from metakv_cl.lightning_cli import resolve_strategy_spec

    config = yaml.safe_load(path.read_text())
    cls, _ = resolve_strategy_spec(config["strategy"])
    assert ("meta_kv" in config["model"]["init_args"]) == cls.uses_meta_kv


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path, capsys):
    command = "compare" if "strategies:" in path.read_text() else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "metakv_cl.data.TaskStream"


def test_compare_refuses_two_strategies_with_one_name_before_training(tmp_path, cli_error):
    config = compare_config(tmp_path / "compare", [
        {"class_path": "metakv_cl.strategies.Naive"}, {"class_path": "metakv_cl.strategies.Naive"},
    ])
    assert "several strategies are named ['naive']" in cli_error(["compare", "--config", write_config(tmp_path, config)])
    assert not (tmp_path / "compare" / "naive").exists()
