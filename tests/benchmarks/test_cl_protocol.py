"""The suite's protocol: declared contrasts, matched arms, the same tuning for every method, fixed compute."""

import json
import math
from pathlib import Path

import pytest
import yaml
from test_cl_suite import smoke_config

from metakv_cl.benchmarks import cl_protocol, cl_suite
from metakv_cl.report import MethodResult
from metakv_cl.strategies.plugins import LoRA, Replay, Validated
from metakv_cl.testing import tiny_llama

GRIDS = {"naive": {"lr": [1e-3, 1e-2]}, "replay": {"lr": [1e-3, 1e-2]},
         "lora-kv-replay": {"lr": [1e-3, 1e-2]}, "lora-kv-replay-validated": {"lr": [1e-3, 1e-2]}}


def protocol_config(tmp_path: Path) -> dict:
    """The smoke suite plus matched K/V arms, a development stream, tuning, a tuned and a fixed-compute plan."""
    config = yaml.safe_load(smoke_config(tmp_path).read_text())
    tasks = config["streams"]["tasks"]
    tasks["loader_args"]["development_items"] = 4
    config["streams"]["dev"] = {**tasks, "title": "development", "loader_args": {
        **tasks["loader_args"], "development": True, "validation_fraction": 0.5}}
    lora_kv = {"class_path": "metakv_cl.strategies.LoRA", "init_args": {"mode": "shared"}, "targets": "kv",
               "lr": "adapter"}
    config["methods"].update({"lora-kv-replay": {**lora_kv, "with": ["replay"]},
                              "lora-kv-replay-validated": {**lora_kv, "with": ["replay", "validated"]}})
    config["schedules"] = {"validated": {"validation_fraction": 0.25, "patience": 1, "max_epochs": 6}}
    config["tuning"] = {"grids": GRIDS}
    methods = ["naive", "replay", "lora-kv-replay", "lora-kv-replay-validated"]
    plan = {"models": ["tiny-pretrained"], "streams": ["tasks"], "methods": methods, "seeds": [0]}
    config["plans"].update({"tune": {**plan, "tune": True, "streams": ["dev"], "seeds": [0, 1]},
                            "tuned": {**plan, "tuned": True}, "fixed": {**plan, "compute": "fixed"}})
    config["protocol"].append({"table": "matched", "plan": "tuned", "reference": "lora-kv-replay-validated",
                               "contrasts": [{"method": "replay", "reference": "lora-kv-replay", "claim": "x"}]})
    return config


def test_the_suite_refuses_a_protocol_or_arm_outside_its_plan(tmp_path):
    config = protocol_config(tmp_path)
    cl_suite.Suite(config)  # the protocol config itself is accepted
    broken = json.loads(json.dumps(config))
    broken["protocol"][1]["contrasts"][0]["method"] = "metakv-replay"
    with pytest.raises(ValueError, match="table 'matched' names 'metakv-replay', which plan 'tuned' does not run"):
        cl_suite.Suite(broken)
    del broken["protocol"][1]["contrasts"][0]["claim"]
    with pytest.raises(ValueError, match="table 'matched': a contrast needs method, reference and claim"):
        cl_suite.Suite(broken)
    cases = [
        ("plans", "fixed", {**config["plans"]["fixed"], "methods": ["naive", "lora-kv-replay-validated"]},
         "plan 'fixed' runs 'lora-kv-replay-validated' with the validated schedule but no method that is the same"),
        ("tuning", "grids", {**GRIDS, "naive": {"lr": [1e-3, 3e-3, 1e-2]}},
         "tuning grids must have the same number of points for every method"),
        ("tuning", "grids", {**GRIDS, "naive": {"lr": [1e-3, 1e-2], "ewc_lambda": [1.0]}},
         "tuning.grids.naive: 'ewc_lambda' is not tunable for this method"),
        ("plans", "tuned", {**config["plans"]["tuned"], "streams": ["dev"]},
         "stream 'dev' is a development stream, which only a tune: true plan may run"),
        ("streams", "tasks", {**config["streams"]["tasks"], "loader_args": {"seed": 3}},
         "stream 'tasks': loader_args.seed is not allowed; the data seed is data_seed"),
        ("streams", "tasks", {**config["streams"]["tasks"], "loader_args": {"order": 1, "development_items": 2}},
         "stream 'tasks' must set loader_args.development_items: 4 like the development stream 'dev'"),
        ("streams", "tasks", {**config["streams"]["tasks"], "scoring": {"exact_match": "yes"}},
         r"stream 'tasks': scoring.exact_match must be one of \[True, False\], got 'yes'"),
        ("streams", "tasks", {**config["streams"]["tasks"], "scoring": {"greedy": True}},
         r"stream 'tasks': scoring.greedy is not a scoring option; known: \['exact_match', 'ranking'\]"),
        ("literature", 0, {**config["literature"][0], "published": {"joint": 80.0}},
         r"literature\[0\]: method 'joint' is not run by plan 'tasks'"),
        ("literature", 0, {**config["literature"][0], "metric": "f1"},
         r"literature\[0\]: metric must be one of \['accuracy', 'exact_match'\], got 'f1'"),
        ("literature", 0, {**config["literature"][0], "published": {"naive": 0.285}, "plan": "nope"},
         r"literature\[0\]: unknown plan 'nope'"),
    ]
    for section, key, value, message in cases:
        broken = json.loads(json.dumps(config))
        broken[section][key] = value
        with pytest.raises(ValueError, match=message):
            cl_suite.Suite(broken)
    broken = json.loads(json.dumps(config))
    broken["plans"]["tuned"]["models"] = ["tiny-scratch"]
    with pytest.raises(ValueError, match="method 'lora-kv-replay' adapts K/V, but model 'tiny-scratch' names no"):
        cl_suite.Suite(broken)


def test_the_suite_config_declares_a_protocol_for_every_reported_plan():
    suite = cl_suite.Suite.load(cl_suite.DEFAULT_CONFIG)
    reported = {name for name, plan in suite.plans.items() if not plan.get("tune")}
    assert {family.plan for family in suite.families} == reported
    assert all(suite.plans[name].get("tuned") for name in reported)  # every reported number uses tuned values
    assert len(suite.seeds) == 5 and all("seed" not in s.get("loader_args", {}) for s in suite.streams.values())


def test_lora_on_kv_matches_the_rank_and_parameter_count_of_meta_kv_factors():
    from peft import LoraModel

    from metakv_cl.modeling import MetaKVConfig, get_meta_kv_model
    from metakv_cl.modeling.meta_kv import meta_kv_parameters
    from metakv_cl.strategies.plugins.lora import make_lora_config

    rank = 4
    kv_config = make_lora_config(tiny_llama(), rank, 16.0, target_modules=["k_proj", "v_proj"])
    lora = LoraModel(tiny_llama(), kv_config, "kv")
    lora_count = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    meta_kv = get_meta_kv_model(tiny_llama(), MetaKVConfig(source="consolidated", rank=rank))
    named = dict(meta_kv.named_parameters())
    factors = sum(p.numel() for name, p in named.items() if name.endswith(("modulation.A", "modulation.B")))
    config = tiny_llama().config
    kv_width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert lora_count == factors == config.num_hidden_layers * 2 * rank * (config.hidden_size + kv_width)
    # what Meta-KV trains beyond the factors: the r x r core's generator and the memory M
    extra = sum(p.numel() for name, p in named.items() if "core_generator" in name or "memories" in name)
    assert sum(p.numel() for p in meta_kv_parameters(meta_kv, "all")) == factors + extra


def test_matched_arms_share_the_buffer_and_schedule_and_fixed_compute_equalises_item_passes(tmp_path):
    suite = cl_suite.Suite(protocol_config(tmp_path))
    bench = cl_suite.Workbench(suite, tmp_path / "runs")
    (cell,) = [c for c in suite.cells(["fixed"]) if c.method == "lora-kv-replay-validated"]
    nominal = cl_suite.Cell(cell.model, cell.stream, cell.method, cell.seed, plan="main")
    strategy = bench.strategy(nominal, bench.module(nominal), tmp_path / "scratch")
    lora, replay, validated = (next(p for p in strategy.plugins if isinstance(p, kind))
                               for kind in (LoRA, Replay, Validated))
    assert lora.target_modules == ["k_proj", "v_proj"] and lora.rank == 4  # the model's Meta-KV rank
    assert replay.memory.buffer_size == 4 and validated.phases == ("train",)
    assert strategy.trainer_kwargs["max_epochs"] == 6
    # 6, 6, 4, 4 training items (QQP and AG News keep 4 beside the 4 set aside for development): 5 on average,
    # + a buffer of 4, x 6 validated epochs = 54 item-passes per experience: 14 steps of 4 for every method
    steps = {c.method: bench.strategy(c, bench.module(c), tmp_path / c.key).trainer_kwargs
             for c in suite.cells(["fixed"])}
    assert {kwargs["max_steps"] for kwargs in steps.values()} == {14}
    assert {kwargs["max_epochs"] for kwargs in steps.values()} == {-1}
    assert cl_protocol.fixed_compute_steps(60, 4, joint=True, fits=1, batch_size=4) == 60
    assert cl_protocol.fixed_compute_steps(60, 4, joint=False, fits=2, batch_size=4) == math.ceil(60 / 8)


def accuracy_result(label: str, average: float, extra: dict) -> MethodResult:
    return MethodResult(label, ["a", "b"], "accuracy", [[0.5, 0.5], [average, 0.5], [average, average]], extra)


def test_tune_picks_each_methods_best_point_and_run_reads_it(tmp_path, capsys):
    """A fake runner writes the tuning cells' results; `tune` chooses; the tuned plan's modules use the choice."""
    config = protocol_config(tmp_path)
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(config))
    suite, runs = cl_suite.Suite(config), tmp_path / "runs"
    best = {"naive": 1, "replay": 0, "lora-kv-replay": 1, "lora-kv-replay-validated": 0}
    for cell in suite.cells(["tune"]):
        score = 0.8 if cell.grid_point == best[cell.method] else 0.6 + 0.1 * cell.seed
        extra = {"model": cell.model, "stream": cell.stream, "seed": cell.seed, "plan": cell.plan,
                 "suite_method": cell.method, "grid_point": cell.grid_point}
        target = cell.result_path(runs)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(accuracy_result(cell.label, score, extra).to_json()))
    assert cl_suite.main(["tune", "--config", str(path), "--runs-dir", str(runs)]) == 0
    chosen = json.loads((runs / "tuning.json").read_text())["chosen"]["tiny-pretrained"]
    assert {method: entry["chosen_index"] for method, entry in chosen.items()} == best
    assert chosen["naive"]["grid"] == [{"lr": 1e-3}, {"lr": 1e-2}]
    assert chosen["naive"]["scores"] == pytest.approx([0.65, 0.8])
    (cell,) = [c for c in suite.cells(["tuned"]) if c.method == "naive"]
    assert cl_suite.Workbench(suite, runs).module(cell).lr == 1e-2
    # the report leaves the development stream out and carries the grids and choices
    cl_suite.main(["report", "--config", str(path), "--runs-dir", str(runs), "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report" / "tiny-pretrained" / "dev").exists()
    protocol = json.loads((tmp_path / "report" / "protocol.json").read_text())
    assert protocol["tuning"]["chosen"]["tiny-pretrained"] == chosen
    index = (tmp_path / "report" / "INDEX.md").read_text()
    assert "| tiny-pretrained | naive | {'lr': [0.001, 0.01]} | 0.650, 0.800 | {'lr': 0.01} |" in index
    with pytest.raises(FileNotFoundError, match="run the tuning plans, then `cl_suite.py tune`, first"):
        cl_suite.Workbench(suite, tmp_path / "elsewhere").hyperparameters(cell)


def test_selection_prefers_lower_loss_breaks_ties_early_and_needs_every_point():
    grids = {"m": {"lr": [1, 2, 3]}}
    losses = {i: [MethodResult("m", ["a"], "loss", [[3.0], [value]])] for i, value in enumerate([2.0, 1.5, 1.5])}
    assert cl_protocol.select_points({"m": losses}, grids)["m"]["chosen"] == {"lr": 2}
    del losses[2]
    with pytest.raises(ValueError, match="method 'm' has no finished run for grid point\\(s\\) \\[2\\]"):
        cl_protocol.select_points({"m": losses}, grids)


def test_plan_prints_the_cell_count_and_time(tmp_path, capsys):
    config = protocol_config(tmp_path)
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cl_suite.main(["plan", "--config", str(path), "--plans", "tune", "fixed", "--runs-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "plan tune: 16 cells" in printed and "plan fixed: 4 cells" in printed  # 4 methods x 2 points x 2 seeds
    assert "20 of 20 cells to run: about" in printed
