"""The GPU benchmark driver on tiny CPU models: planning, parallel workers, resume, packing, merged reports."""

import json
import shutil
import tarfile
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from metakv_cl.benchmarks import cl_suite
from metakv_cl.testing import tiny_llama
from metakv_cl.training.runner import StreamState

TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "single_device_resident",
           "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False, "logger": False}
LEARNING_RATES = {"full": 3e-3, "adapter": 3e-3, "metakv": 1e-2}


def write_downstream_data(root: Path) -> Path:
    """A miniature copy of the offline data for downstream order 1 (dbpedia, amazon, QQP, agnews)."""
    def write(folder: Path, labels: list[str], files=("train", "test")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labels.json").write_text(json.dumps(labels))
        for split in files:
            records = [{"label": label, "sentence": f"{split} text {i} about {label.lower()} things"}
                       for i in range(4) for label in labels]
            (folder / f"{split}.json").write_text(json.dumps(records))

    write(root / "dbpedia14", ["Company", "Artist", "Village"], files=("test",))
    write(root / "cl_benchmark" / "amazon", ["negative", "neutral", "positive"])
    write(root / "cl_benchmark" / "QQP", ["False", "True"])
    write(root / "cl_benchmark" / "agnews", ["World", "Sports"])
    return root


def smoke_config(tmp_path: Path) -> Path:
    """A suite of tiny models and streams: a from-scratch GPT-2 with a warm-up, a saved Llama (SmolLM2's family)."""
    pretrained = tmp_path / "tiny-pretrained"
    tiny_llama(vocab_size=1024, hidden_size=32, intermediate_size=64).save_pretrained(pretrained)
    data = write_downstream_data(tmp_path / "data")
    config = {
        "name": "smoke",
        "seeds": [0, 1],
        "data_seed": 0,
        "trainer": TRAINER,
        "models": {
            "tiny-scratch": {
                "title": "tiny GPT-2 shape, trained from scratch", "label": "1 layer, 32 wide",
                "model": "gpt2", "from_scratch": True, "tokenizer": "word-level",
                "config_overrides": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64},
                "warmup": {"loader": "metakv_cl.data.synthetic.synthetic_topic_tasks",
                           "loader_args": {"num_experiences": 1, "entities_per_topic": 2, "seed": 9}, "epochs": 1},
                "meta_kv": {"source": "consolidated", "rank": 4}, "learning_rates": LEARNING_RATES,
            },
            "tiny-pretrained": {
                "title": "tiny Llama (saved)", "label": "a saved tiny model", "model": str(pretrained),
                "tokenizer": "word-level", "meta_kv": {"source": "consolidated", "rank": 4},
                "kv_projections": ["k_proj", "v_proj"], "learning_rates": LEARNING_RATES,
            },
        },
        "streams": {
            "topics": {"title": "synthetic topics", "loader": "metakv_cl.data.synthetic.synthetic_topic_tasks",
                       "loader_args": {"num_experiences": 2, "entities_per_topic": 2}, "max_length": 64,
                       "train_mb_size": 8, "eval_mb_size": 16, "replay_buffer": 8},
            "tasks": {"title": "downstream order 1", "notes": "QQP stands in for Yahoo",
                      "loader": "metakv_cl.data.downstream.downstream_tasks",
                      "loader_args": {"order": 1, "max_train": 6, "max_test": 4, "root": str(data)},
                      "max_length": 64, "overflow": "truncate", "train_mb_size": 4, "eval_mb_size": 4,
                      "replay_buffer": 4, "scoring": {"exact_match": True}},
        },
        "methods": {
            "naive": {"class_path": "metakv_cl.strategies.Naive"},
            "replay": {"class_path": "metakv_cl.strategies.Replay"},
            "joint": {"class_path": "metakv_cl.strategies.JointTraining"},
            "metakv-replay": {"class_path": "metakv_cl.strategies.MetaKVConsolidation",
                              "init_args": {"mode": "replay"}, "meta_kv": True, "lr": "metakv"},
            "metakv-distill": {"class_path": "metakv_cl.strategies.MetaKVConsolidation",
                               "init_args": {"mode": "distill"}, "meta_kv": True, "lr": "metakv",
                               "lr_args": {"fast_lr": "adapter"}, "fits_per_experience": 2},
        },
        "plans": {
            "main": {"priority": 1, "models": ["tiny-scratch"], "streams": ["topics"],
                     "methods": ["replay", "metakv-replay"]},
            "tasks": {"priority": 2, "seeds": [0], "models": ["tiny-pretrained"], "streams": ["tasks"],
                      "methods": ["naive", "metakv-distill"]},
        },
        "protocol": [{"table": "topics", "plan": "main", "reference": "replay", "contrasts": [
            {"method": "metakv-replay", "reference": "replay", "claim": "Meta-KV minus replay"}]}],
        "literature": [{"plan": "tasks", "source": "A paper", "model": "a bigger model", "metric": "exact_match",
                        "published": {"naive": 28.5}, "names": {"naive": "SeqFT"}, "differences": "the model"}],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_call(tmp_path_factory):
    """One `run` call of the whole smoke suite with a worker process (shared by the tests)."""
    tmp_path = tmp_path_factory.mktemp("suite")
    config = smoke_config(tmp_path)
    runs = tmp_path / "runs"
    archive = tmp_path / "out" / "cl_suite.tar.gz"
    status = cl_suite.main(["run", "--config", str(config), "--runs-dir", str(runs), "--workers", "1",
                            "--time-budget", "240", "--pack", str(archive), "--commit", "abc123", "--call-id", "first"])
    assert status == 0
    return config, runs, archive


def run_worker_in_process(config: Path, runs: Path, call_id: str, plans: list[str], seconds: float) -> None:
    """What one worker of a `run` call does, in this process: plan, then take cells until the deadline."""
    suite = cl_suite.Suite.load(config)
    (runs / "calls" / call_id).mkdir(parents=True)
    plan = cl_suite.make_plan(suite, suite.cells(plans), runs)
    (runs / "calls" / call_id / "plan.json").write_text(json.dumps(plan))
    args = Namespace(config=config, runs_dir=str(runs), call_id=call_id, worker_id=0, workers=1, threads=1,
                     deadline=time.time() + seconds)
    assert cl_suite.worker_main(args) == 0


def results(runs: Path) -> dict[str, dict]:
    return {str(path.relative_to(runs / "results")): json.loads(path.read_text())
            for path in (runs / "results").rglob("seed*.json")}


def test_run_writes_every_cell_with_its_facts_and_packs(finished_call):
    config, runs, archive = finished_call
    found = results(runs)
    errors = [path.read_text() for path in (runs / "results").rglob("*.error.txt")]
    assert not errors, errors[0]
    assert len(found) == 6, sorted(found)
    replay = found["tiny-scratch/topics/replay/seed1.json"]
    assert len(replay["matrix"]) == 3 and replay["summary"]["forgetting"] is not None
    facts = replay["extra"]
    assert facts["buffer_size"] == 8 and facts["call"] == "first" and facts["concurrency"] == 1
    assert (facts["train_mb_size"], facts["eval_mb_size"]) == (8, 16)  # the stream's batch sizes, as run
    assert facts["peak_memory_bytes"] > 0 and facts["wall_time_s"] > 0 and facts["trainable_params"] > 0
    metakv = found["tiny-scratch/topics/metakv-replay/seed0.json"]["extra"]
    assert metakv["buffer_size"] == 8  # the same replay budget for every method that replays
    assert 0 < metakv["trainable_params"] < facts["trainable_params"]  # only Meta-KV trains
    assert found["tiny-pretrained/tasks/naive/seed0.json"]["extra"]["buffer_size"] is None
    distill = found["tiny-pretrained/tasks/metakv-distill/seed0.json"]
    assert distill["score_name"] == "accuracy" and "qqp (yahoo substitute)" in distill["experience_names"]
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "results/tiny-scratch/topics/replay/seed0.json" in names and "calls/first/call.json" in names
    assert any(name.startswith("logs/first/worker") for name in names)
    assert not any(name.startswith("scratch") for name in names)  # no run folders or weights
    record = json.loads((runs / "calls" / "first" / "call.json").read_text())
    assert record["commit"] == "abc123" and record["command"].startswith("python benchmarks/cl_suite.py run")
    summary = json.loads((runs / "calls" / "first" / "summary.json").read_text())
    assert summary["cells_done"] == 6 and summary["missing"] == []


def test_a_later_call_runs_only_the_missing_cells(finished_call, tmp_path):
    config, runs, _ = finished_call
    copy = tmp_path / "runs"
    shutil.copytree(runs / "results", copy / "results")
    (copy / "results" / "tiny-scratch" / "topics" / "replay" / "seed1.json").unlink()
    run_worker_in_process(config, copy, "second", ["main"], seconds=120)
    calls = {key: value["extra"]["call"] for key, value in results(copy).items()}
    assert calls.pop("tiny-scratch/topics/replay/seed1.json") == "second"
    assert set(calls.values()) == {"first"} and len(calls) == 5


def test_worker_starts_no_cell_past_its_deadline(finished_call, tmp_path):
    config, _, _ = finished_call
    runs = tmp_path / "runs"
    run_worker_in_process(config, runs, "late", ["main"], seconds=0.5)
    assert not (runs / "results").exists()


def test_report_merges_calls_into_per_stream_folders(finished_call, tmp_path):
    config, runs, _ = finished_call
    first, second = tmp_path / "a", tmp_path / "b"
    for path in (runs / "results").rglob("seed*.json"):
        target = (first if path.name == "seed0.json" else second) / path.relative_to(runs)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    shutil.copytree(runs / "calls", first / "calls")
    out = tmp_path / "report"
    cl_suite.main(["report", "--config", str(config), "--runs-dir", str(first), str(second), "--out", str(out)])
    topics = (out / "tiny-scratch" / "topics" / "README.md").read_text()
    assert topics.startswith("# tiny GPT-2 shape, trained from scratch: synthetic topics")
    assert "| replay | loss | 2 |" in topics  # seed 0 from one runs dir, seed 1 from the other
    assert "- **commit**: abc123" in topics and "- **command**: python benchmarks/cl_suite.py run" in topics
    assert "Meta-KV consolidation against the baselines" in topics and "metakv-replay" in topics
    tasks = json.loads((out / "tiny-pretrained" / "tasks" / "results.json").read_text())
    assert tasks["statistics"]["naive"]["score_name"] == "accuracy"
    assert tasks["header"]["data"] == "QQP stands in for Yahoo"
    for name in ("forgetting.png", "heatmap_replay.png", "heatmap_metakv_replay.png"):
        assert (out / "tiny-scratch" / "topics" / name).is_file()
    assert "tiny-pretrained/tasks/README.md" in (out / "INDEX.md").read_text()
    # the declared protocol: the reference's differences in the stream report, the contrast in the index
    assert "## Difference to replay (method minus replay)" in topics
    assert "- **primary contrasts**: metakv-replay minus replay: Meta-KV minus replay" in topics
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["families"][0]["reference"] == "replay" and protocol["data_seed"] == 0
    (contrast,) = protocol["contrasts"]
    average = contrast["streams"]["topics"]["average"]
    assert average["low"] <= average["estimate"] <= average["high"]
    assert average["p_holm"] == average["p_value"]  # one stream: Holm leaves a family of one unchanged
    index = (out / "INDEX.md").read_text()
    assert "### topics: metakv-replay minus replay" in index and "No tuning.json in the runs dirs" in index
    # the stream's scoring reached the module: exact match beside ranking, and beside the published number
    naive = json.loads((first / "results" / "tiny-pretrained" / "tasks" / "naive" / "seed0.json").read_text())
    assert "exact_match" in naive and len(naive["exact_match"]["matrix"]) == len(naive["matrix"])
    (anchor,) = protocol["literature"]
    (row,) = anchor["rows"]
    ours = 100 * naive["exact_match"]["summary"]["average"]
    assert row["name"] == "SeqFT" and row["published"] == 28.5 and row["ours_average"] == pytest.approx(ours)
    assert "## Beside the literature" in index and f"| SeqFT (`naive`) | 28.5 | {ours:.1f} |" in index
    # --readme rewrites only the page's generated block, with the contrast's interval from protocol.json
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- generated: cl_suite primary contrasts -->\nold\n"
                      "<!-- end generated: cl_suite primary contrasts -->\nrest\n")
    cl_suite.main(["report", "--config", str(config), "--runs-dir", str(first), str(second), "--out", str(out),
                   "--readme", str(readme)])
    page = readme.read_text()
    assert page.startswith("intro\n") and page.endswith("rest\n") and "old" not in page
    assert "From `report/protocol.json`" in page
    assert f"{average['estimate']:.3f} [{average['low']:.3f}, {average['high']:.3f}]" in page


def test_a_page_without_its_generated_block_markers_is_refused():
    from metakv_cl.report import replace_generated_block

    with pytest.raises(ValueError, match="the page needs exactly one '<!-- generated: x -->'"):
        replace_generated_block("no markers", "x", "content")
    assert replace_generated_block("a<!-- generated: x -->b<!-- end generated: x -->c", "x", "new") == (
        "a<!-- generated: x -->\nnew\n<!-- end generated: x -->c")


def test_report_leaves_differences_out_until_every_method_ran_the_references_seeds(finished_call, tmp_path):
    config, runs, _ = finished_call
    partial = tmp_path / "runs"
    shutil.copytree(runs / "results", partial / "results")
    (partial / "results" / "tiny-scratch" / "topics" / "metakv-replay" / "seed1.json").unlink()
    out = tmp_path / "report"
    cl_suite.main(["report", "--config", str(config), "--runs-dir", str(partial), "--out", str(out)])
    topics = (out / "tiny-scratch" / "topics" / "README.md").read_text()
    assert "## 95% intervals" in topics and "## Difference to replay" not in topics
    (contrast,) = json.loads((out / "protocol.json").read_text())["contrasts"]
    assert contrast["streams"]["topics"]["seeds"] == [0]  # the contrast pairs the seeds both methods ran


def test_suite_config_errors_name_the_problem(tmp_path):
    config = yaml.safe_load(smoke_config(tmp_path).read_text())
    broken = {**config, "plans": {"main": {**config["plans"]["main"], "methods": ["replay", "nope"]}}}
    with pytest.raises(ValueError, match="plan 'main' lists unknown or no methods: \\['nope'\\]"):
        cl_suite.Suite(broken)
    with pytest.raises(ValueError, match="missing section"):
        cl_suite.Suite({"models": {}})
    with pytest.raises(ValueError, match="unknown plan"):
        cl_suite.Suite(config).cells(["absent"])
    cells = cl_suite.Suite(config).cells()
    assert len(cells) == 6 and cells[0].key == "tiny-scratch/topics/replay/seed0"
    kept = cl_suite.Suite(config).cells(methods=["replay"])
    assert kept and all(cell.method == "replay" for cell in kept)
    assert {cell.key for cell in kept} == {cell.key for cell in cells if cell.method == "replay"}
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['nope'\] in --methods"):
        cl_suite.Suite(config).cells(methods=["nope"])
    assert cl_suite.Suite(config).cells(streams=["tasks"]) == [cell for cell in cells if cell.stream == "tasks"]
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['nope'\] in --streams"):
        cl_suite.Suite(config).cells(streams=["nope"])


def test_pack_carries_the_tuned_choices(tmp_path):
    runs = tmp_path / "runs"
    (runs / "results" / "m" / "s").mkdir(parents=True)
    (runs / "results" / "m" / "s" / "seed0.json").write_text("{}")
    (runs / "tuning.json").write_text('{"chosen": {}}')
    (runs / "scratch").mkdir()
    with tarfile.open(cl_suite.pack(runs, tmp_path / "out.tar.gz")) as tar:
        names = tar.getnames()
    assert "tuning.json" in names and "results/m/s/seed0.json" in names
    assert not any(name.startswith("scratch") for name in names)


def test_a_cell_stopped_between_experiences_resumes_there(finished_call, tmp_path, monkeypatch):
    config, runs, _ = finished_call
    suite = cl_suite.Suite.load(config)
    cell = next(c for c in suite.cells(["tasks"]) if c.key == "tiny-pretrained/tasks/naive/seed0")
    later_runs = tmp_path / "runs"
    original_save, saves = StreamState.save, []

    def save_then_stop(self, *args, **kwargs):  # the call's budget stops the cell after its first experience
        original_save(self, *args, **kwargs)
        saves.append(1)
        if len(saves) == 2:  # the row before training, then the first experience's
            raise KeyboardInterrupt

    monkeypatch.setattr(StreamState, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cl_suite.Workbench(suite, later_runs, "stopped").run(cell)
    monkeypatch.undo()
    assert not cell.result_path(later_runs).exists() and cell.share_done(later_runs) == 0.25
    trained = []
    original_train = cl_suite.ContinualStrategy.train
    monkeypatch.setattr(cl_suite.ContinualStrategy, "train",
                        lambda self, *args, **kwargs: trained.append(1) or original_train(self, *args, **kwargs))
    resumed = cl_suite.Workbench(suite, later_runs, "next").run(cell)
    assert len(trained) == 3  # the experiences after the first, not the first again
    assert resumed.extra["resumed_at_share"] == 0.25
    assert resumed.matrix == json.loads(cell.result_path(runs).read_text())["matrix"]  # as if never stopped
    assert not cell.run_folder(later_runs).exists()  # a finished cell's weights are not kept


def test_the_estimate_prices_evaluation_forward_calls_and_start_up(tmp_path):
    suite = cl_suite.Suite.load(smoke_config(tmp_path))
    benchmark = cl_suite.Workbench(suite, tmp_path / "runs").benchmark("tiny-pretrained", "tasks")
    test_set = benchmark.test_stream[0].dataset
    # per batch: the prompt pass and the candidates' pass (exact match is read off the latter)
    assert cl_suite._evaluation_cost(test_set, 1)[1] == 2 * len(test_set)
    assert cl_suite._evaluation_cost(test_set, len(test_set))[1] == 2

    cell = cl_suite.Cell("tiny-pretrained", "tasks", "naive", 0)
    unpriced = cl_suite.estimate_cell(suite, cell, benchmark)
    suite.throughput.update(eval_call_s=0.5, startup_s=7.0)
    priced = cl_suite.estimate_cell(suite, cell, benchmark)
    calls = sum(cl_suite._evaluation_cost(e.dataset, 4)[1] for e in benchmark.test_stream)
    evaluations = benchmark.num_experiences + 1  # before training and after each experience
    assert priced.device_s - unpriced.device_s == pytest.approx(evaluations * calls * 0.5)
    assert priced.host_s - unpriced.host_s == pytest.approx(7.0)


def test_the_plan_takes_device_seconds_from_finished_cells_of_the_same_method_and_stream(tmp_path):
    config = smoke_config(tmp_path)
    suite, runs = cl_suite.Suite.load(config), tmp_path / "runs"
    for seed, wall, concurrency in [(0, 90.0, 2), (1, 50.0, 1)]:
        path = cl_suite.Cell("tiny-pretrained", "tasks", "naive", seed).result_path(runs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"extra": {"cell_wall_time_s": wall, "concurrency": concurrency}}))
    plan = {entry["method"]: entry for entry in cl_suite.make_plan(suite, suite.cells(["tasks"]), runs)}
    naive, distill = plan["naive"], plan["metakv-distill"]
    host = naive["host_s"]
    assert naive["measured_cells"] == 2
    assert naive["device_s"] == pytest.approx(((90.0 - host) / 2 + (50.0 - host) / 1) / 2)
    benchmark = cl_suite.Workbench(suite, runs).benchmark("tiny-pretrained", "tasks")
    estimate = cl_suite.estimate_cell(suite, cl_suite.Cell("tiny-pretrained", "tasks", "metakv-distill", 0), benchmark)
    assert distill["measured_cells"] == 0 and distill["device_s"] == pytest.approx(estimate.device_s)


def test_a_resumed_cell_does_not_calibrate_the_estimates():
    assert cl_suite.whole_cell_wall_time({"cell_wall_time_s": 300.0, "resumed_at_share": 0.0}) == 300.0
    assert cl_suite.whole_cell_wall_time({"cell_wall_time_s": 300.0}) == 300.0  # cells run before resuming existed
    assert cl_suite.whole_cell_wall_time({"cell_wall_time_s": 90.0, "resumed_at_share": 0.75}) is None


def test_the_report_names_the_evaluation_batches_and_warns_where_runs_differ():
    from types import SimpleNamespace

    def runs(*sizes):
        return [SimpleNamespace(extra={} if size is None else {"eval_mb_size": size}) for size in sizes]

    assert cl_suite.evaluation_batches(runs(16, 16)) == "16"
    assert cl_suite.evaluation_batches(runs(None)) == "not recorded"
    assert cl_suite.evaluation_batches(runs(16, None)) == "16 (and runs that did not record it)"
    assert cl_suite.evaluation_batches(runs(16, 64)).endswith("WARNING, runs scored with different batch sizes are compared here")
