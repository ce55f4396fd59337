"""The engine-throughput benchmark on a tiny CPU model: same batches on every path, JSON and its page."""

import json

import pytest

from metakv_cl.benchmarks import engine_throughput

TINY_RUN = ["--documents", "16", "--batch-size", "4", "--threads", "1"]


def saved_run(out):
    """The JSON and the page a run left at ``out``."""
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_every_path_trains_the_same_batches_and_the_page_is_rendered_from_the_json(tmp_path, capsys):
    out = tmp_path / "throughput"
    result = engine_throughput.main([
        *TINY_RUN, "--rounds", "1", "--warmup-rounds", "1", "--presets", "naive", "replay", "--eval-batch-size", "8",
        "--out", str(out),
    ])
    paths = result["paths"]
    assert list(paths) == ["bare padded", "bare packed", "engine naive", "engine replay"]
    # 2 experiences x 4 batches, the first of each untimed: the engine's naive fit sees the bare loop's batches
    assert paths["engine naive"]["timed_tokens"] == paths["bare packed"]["timed_tokens"] == paths["bare padded"]["timed_tokens"]
    assert paths["engine replay"]["timed_tokens"] > paths["engine naive"]["timed_tokens"]  # replayed items
    assert result["reference"] == "bare packed" and paths["bare packed"]["ratio"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in paths.values())
    assert result["complete"] and result["progress"] == {"path_runs_finished": 10, "path_runs_planned": 10,
                                                         "rounds_finished": 1, "stopped": None}
    saved, page = saved_run(out)
    assert saved == json.loads(json.dumps(result))
    assert saved["command"].startswith("python ") and saved["versions"]["torch"]
    assert page == engine_throughput.render_markdown(saved) and "Partial run" not in page
    evaluation = result["evaluation"]  # every training document scored: its tokens but the first
    documents = result["documents"]
    assert evaluation["scored_tokens"] == round(result["document_tokens"]["mean"] * documents) - documents
    assert evaluation["tokens_per_s"] > 0 and f"{evaluation['tokens_per_s']:,.0f} scored tokens/s" in page
    row = next(line for line in page.splitlines() if line.startswith("| engine naive |"))
    assert f"{paths['engine naive']['tokens_per_s']:,.0f}" in row and f"{paths['engine naive']['ratio']:.2f}" in row
    # each path run's wall time (the whole path) beside its timed steps, in the JSON, on the page and the console
    warm_up, runs = result["measurements"][:5], result["measurements"][5:]  # the warm-up round counts in no median
    assert [run["path"] for run in runs] == [run["path"] for run in warm_up] == [*paths, "engine evaluation"]
    assert all(run["wall_s"] > run["timed_s"] > 0 for run in warm_up + runs)
    assert [row["wall_s_rounds"] for row in paths.values()] == [[run["wall_s"]] for run in runs[:4]]
    assert [row["tokens_per_s_rounds"] for row in paths.values()] == [[run["tokens_per_s"]] for run in runs[:4]]
    assert "| warm-up 1 | bare padded |" in page
    wall_row = next(line for line in page.splitlines() if line.startswith("| round 1/1 | engine replay |"))
    assert f"| {runs[3]['wall_s']:.2f} |" in wall_row
    console = capsys.readouterr().out
    assert f"wall {runs[3]['wall_s']:7.1f} s (timed steps {runs[3]['timed_s']:.1f} s)" in console


@pytest.mark.parametrize("failing, finished", [
    ("engine_run", ["bare padded", "bare packed"]),
    ("bare_loop", []),  # the first path: the file still says what was being measured, and that nothing finished
])
def test_a_run_whose_path_fails_keeps_the_paths_it_finished(tmp_path, monkeypatch, failing, finished):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine_throughput, failing, out_of_memory)
    out = tmp_path / "throughput"
    with pytest.raises(RuntimeError, match="out of memory"):
        engine_throughput.main([*TINY_RUN, "--rounds", "2", "--presets", "naive", "--out", str(out)])
    saved, page = saved_run(out)
    assert not saved["complete"] and saved["settings"]["presets"] == ["naive"]
    assert saved["progress"] == {"path_runs_finished": len(finished), "path_runs_planned": 6, "rounds_finished": 0,
                                 "stopped": None}
    assert list(saved["paths"]) == finished
    assert page == engine_throughput.render_markdown(saved)
    assert page.splitlines()[2].startswith(f"**Partial run**: {len(finished)} of 6 path runs finished, "
                                           "0 of 2 timed rounds; the run ended")


@pytest.mark.parametrize("budget, finished, stopped_before", [
    (50, ["bare padded"], "round 1/2 bare packed"),  # tiny: the first path alone
    # round 2's bare padded is predicted by its round-1 wall time: 200 s spent + 100 s > 250 s
    (250, ["bare padded", "bare packed", "engine naive"], "round 2/2 bare padded"),
])
def test_a_time_budget_stops_before_a_path_that_would_overrun_it(tmp_path, monkeypatch, budget, finished, stopped_before):
    clock = {"now": 0.0}  # a wall clock that only the bare loops move, 100 s each
    bare_loop = engine_throughput.bare_loop

    def slow_bare_loop(*args, **kwargs):
        bare_loop(*args, **kwargs)
        clock["now"] += 100

    monkeypatch.setattr(engine_throughput, "wall_clock", lambda: clock["now"])
    monkeypatch.setattr(engine_throughput, "bare_loop", slow_bare_loop)
    out = tmp_path / "throughput"
    result = engine_throughput.main([*TINY_RUN, "--rounds", "2", "--presets", "naive", "--time-budget", str(budget),
                                     "--out", str(out)])
    saved, page = saved_run(out)
    assert saved == json.loads(json.dumps(result)) and not saved["complete"]
    assert [run["path"] for run in saved["measurements"]] == finished
    assert saved["measurements"][0]["wall_s"] == 100
    assert saved["progress"]["stopped"] == f"--time-budget {budget} s: stopped before {stopped_before}"
    assert f"**Partial run**: {len(finished)} of 6 path runs finished" in page and stopped_before in page


def test_a_pack_length_shorter_than_a_document_is_refused():
    with pytest.raises(ValueError, match=r"--pack-length 8 is shorter than the longest document \(\d+ tokens\)"):
        engine_throughput.main(["--documents", "4", "--rounds", "1", "--pack-length", "8", "--presets", "naive"])
