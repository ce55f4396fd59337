"""Reports: MethodResult JSON round trip, tables, seed aggregation and the written files."""

import json
import math

import pytest

from metakv_cl.report import (
    MethodResult,
    aggregate_seeds,
    comparison_notes,
    format_table,
    mean_result,
    seed_statistics,
    write_report,
    write_seed_report,
)

NAMES = ["people", "cities", "companies"]
ACCURACY = [[0.1, 0.2, 0.3], [0.9, 0.3, 0.2], [0.6, 0.8, 0.4], [0.5, 0.7, 0.9]]
LOSS = [[4.0, 4.0, 4.0], [2.0, 3.5, 3.8], [2.5, 1.5, 3.0], [3.0, 2.0, 1.0]]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results():
    return [
        MethodResult("naive", NAMES, "loss", LOSS, {"wall_time_s": 12.34, "trainable_params": 1234567, "seed": 0,
                                                    "train_tokens_per_s": 5432.1}),
        MethodResult("Meta-KV (distill)", NAMES, "loss", [[c - 0.5 for c in row] for row in LOSS],
                     {"wall_time_s": 20.0, "trainable_params": 4096, "seed": 0}),
        MethodResult("replay", NAMES, "loss", LOSS[:2] + [[None, None, None]]),  # partial, one row unmeasured
    ]


def test_summary_property_matches_hand_values():
    accuracy = MethodResult("ewc", NAMES, "accuracy", ACCURACY)
    assert accuracy.summary["forgetting"] == pytest.approx(0.25)
    assert accuracy.summary["bwt"] == pytest.approx(-0.25)
    loss = MethodResult("naive", NAMES, "loss", LOSS)
    assert loss.summary["forgetting"] == pytest.approx(0.75)
    assert loss.summary["perplexity"] == pytest.approx(math.exp(2.0))


def test_json_round_trip_through_text_keeps_nan_cells():
    original = _results()[2]
    original.extra = {"peak_memory_bytes": 123, "nested": {"values": (1.5, float("nan"))}}
    text = json.dumps(original.to_json())
    assert "NaN" not in text  # strict JSON: unmeasured cells are null
    restored = MethodResult.from_json(text)
    assert restored.method == "replay" and restored.score_name == "loss"
    assert restored.matrix[:2] == LOSS[:2]
    assert all(math.isnan(cell) for cell in restored.matrix[2])
    assert restored.extra == {"peak_memory_bytes": 123, "nested": {"values": [1.5, None]}}
    assert MethodResult.from_json(restored.to_json()).to_json() == restored.to_json()


def test_method_result_validation():
    with pytest.raises(ValueError, match="score_name"):
        MethodResult("x", NAMES, "f1", ACCURACY)
    with pytest.raises(ValueError, match="one score per experience"):
        MethodResult("x", NAMES, "accuracy", [[0.1, 0.2]])
    with pytest.raises(KeyError, match="matrix"):
        MethodResult.from_json({"method": "x", "experience_names": NAMES, "score_name": "loss"})


def test_format_table_rows_and_columns():
    table = format_table(_results())
    lines = table.splitlines()
    assert lines[0] == ("| method | score | average | forgetting | BWT | FWT | perplexity | wall time (s) "
                        "| train tokens/s | trainable params |")
    assert lines[2] == "| naive | loss | 2.000 | 0.750 | -0.750 | 0.750 | 7.389 | 12.3 | 5432 | 1,234,567 |"
    # The partial run: only experience 1 trained (a trailing unmeasured row is not counted);
    # FWT of experience 2 for a loss: R[0][2] - R[1][2] = 4.0 - 3.5.
    assert lines[4] == "| replay (1/3 trained) | loss | 2.000 | – | – | 0.500 | 7.389 | – | – | – |"
    with pytest.raises(ValueError, match="unique"):
        format_table([_results()[0], _results()[0]])
    with pytest.raises(ValueError, match="no results"):
        format_table([])


def test_aggregate_seeds_mean_and_std():
    seed0 = [MethodResult("naive", NAMES, "accuracy", ACCURACY, {"wall_time_s": 10.0})]
    shifted = [[c + 0.1 for c in row] for row in ACCURACY]
    seed1 = [MethodResult("naive", NAMES, "accuracy", shifted, {"wall_time_s": 14.0})]
    stats = seed_statistics([seed0, seed1])["naive"]
    assert stats["seeds"] == 2
    assert stats["average"]["mean"] == pytest.approx(0.75)
    assert stats["average"]["std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # sample std of 0.7, 0.8
    assert stats["forgetting"]["std"] == pytest.approx(0.0)
    table = aggregate_seeds([seed0, seed1])
    assert "| naive | accuracy | 2 | 0.750 ± 0.071 | 0.250 ± 0.000 | -0.250 ± 0.000 | 0.100 ± 0.000 | 12.0 ± 2.8 |" in table
    assert "perplexity" not in table
    with pytest.raises(ValueError, match="mixes score names"):
        seed_statistics([seed0, [MethodResult("naive", NAMES, "loss", LOSS)]])


def test_write_report_files(tmp_path):
    results = _results()
    paths = write_report(results, tmp_path / "out")
    expected_pngs = {"forgetting_plot"} | {f"{kind}:{r.method}" for r in results for kind in ("heatmap", "curves")}
    assert set(paths) == expected_pngs | {"json", "markdown"}
    for key in expected_pngs:
        data = paths[key].read_bytes()
        assert data.startswith(PNG_SIGNATURE), key
        assert len(data) > 5000, key  # a real plot, not an empty canvas
    assert paths["heatmap:Meta-KV (distill)"].name == "heatmap_meta_kv_distill.png"

    report = json.loads(paths["json"].read_text())
    assert [MethodResult.from_json(entry).method for entry in report["methods"]] == [r.method for r in results]
    assert report["methods"][0]["summary"]["bwt"] == pytest.approx(-0.75)
    assert report["plots"]["forgetting_plot"] == "forgetting.png"

    markdown = paths["markdown"].read_text()
    assert format_table(results) in markdown
    assert "| after 2: cities | 2.500 | 1.500 | 3.000 |" in markdown
    assert "![R heatmap](heatmap_naive.png)" in markdown


def test_write_report_mixed_scores_and_clashing_slugs(tmp_path):
    results = [MethodResult("LoRA shared", NAMES, "accuracy", ACCURACY),
               MethodResult("lora-shared", NAMES, "loss", LOSS)]
    paths = write_report(results, tmp_path)
    assert paths["heatmap:LoRA shared"] != paths["heatmap:lora-shared"]
    assert paths["forgetting_plot"].read_bytes().startswith(PNG_SIGNATURE)


def _seeded(method, shift, extra=None):
    return MethodResult(method, NAMES, "loss", [[c + shift for c in row] for row in LOSS], extra or {})


def test_aggregate_seeds_reports_memory_and_parameters():
    facts = {"wall_time_s": 10.0, "peak_memory_bytes": 2 * 2**30, "trainable_params": 5000}
    table = aggregate_seeds([[_seeded("naive", 0.0, facts)], [_seeded("naive", 0.2, {**facts, "peak_memory_bytes": 2**30})]])
    assert table.splitlines()[0].endswith("| wall time (s) | peak memory (GiB) | trainable params |")
    assert table.splitlines()[2].endswith("| 10.0 ± 0.0 | 1.50 ± 0.71 | 5,000 |")


def test_mean_result_averages_cells_and_skips_missing_ones():
    partial = MethodResult("naive", NAMES, "loss", LOSS[:2] + [[None, 1.0, None]])
    mean = mean_result([_seeded("naive", 0.0), _seeded("naive", 1.0), partial])
    assert mean.matrix[0] == pytest.approx([c + 1 / 3 for c in LOSS[0]])
    assert mean.matrix[2] == pytest.approx([LOSS[2][0] + 0.5, (LOSS[2][1] * 2 + 1 + 1.0) / 3, LOSS[2][2] + 0.5])
    assert mean.matrix[3] == pytest.approx([c + 0.5 for c in LOSS[3]]) and mean.extra == {"seeds": 3}
    with pytest.raises(ValueError, match="different methods"):
        mean_result([_seeded("naive", 0.0), _seeded("replay", 0.0)])


def test_comparison_notes_name_the_baselines_a_candidate_does_not_beat():
    stats = seed_statistics([[_seeded("metakv", 0.0), _seeded("replay", -0.1), _seeded("naive", 0.3)]])
    notes = comparison_notes(stats, ["metakv"])
    # losses: replay's lower average beats metakv; forgetting is a shift-invariant tie, so both baselines match it
    assert notes[0].startswith("- **metakv does not beat** replay (1.900) on average")  # one seed: no spread
    assert "naive" not in notes[0]
    assert "on forgetting" in notes[1] and "replay" in notes[1] and "naive" in notes[1]
    forgetful = [[4.0, 4.0, 4.0], [1.0, 4.0, 4.0], [4.0, 1.0, 4.0], [5.0, 5.0, 1.0]]
    better = seed_statistics([[_seeded("metakv", -1.0), MethodResult("naive", NAMES, "loss", forgetful)]])
    assert comparison_notes(better, ["metakv"]) == ["- metakv beats every baseline on final average and forgetting."]


def test_write_seed_report_files(tmp_path):
    seeds = [[_seeded("naive", shift), _seeded("metakv-replay", shift - 0.2)] for shift in (0.0, 0.1, 0.2)]
    header = {"command": "python benchmarks/cl_suite.py run", "model": "GPT-2 small shape, trained from scratch"}
    paths = write_seed_report(seeds, tmp_path / "stream", title="GPT-2: topics", header=header,
                              candidates=["metakv-replay"])
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# GPT-2: topics") and "- **model**: GPT-2 small shape, trained from scratch" in markdown
    assert "| naive | loss | 3 |" in markdown and "## metakv-replay: R averaged over 3 seed(s)" in markdown
    assert "Meta-KV consolidation against the baselines" in markdown
    report = json.loads(paths["json"].read_text())
    assert report["header"] == header and len(report["runs"]) == 3
    assert report["statistics"]["naive"]["average"]["mean"] == pytest.approx(2.1)
    assert report["mean_matrices"]["naive"][1] == pytest.approx([c + 0.1 for c in LOSS[1]])
    for key in ("forgetting_plot", "heatmap:naive", "heatmap:metakv-replay"):
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)


# per-item outcomes: two experiences of 6 test items, gold labels of 2 choices (majority rates 4/6 and 5/6)
GOLD = [[0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0]]


def _classification(method, predicted_rows):
    """An accuracy result whose R cells are the accuracies of the given per-item predictions."""
    matrix = [[sum(p == g for p, g in zip(task, gold)) / len(gold) for task, gold in zip(row, GOLD)]
              for row in predicted_rows]
    items = {"gold": GOLD, "num_choices": [2, 2], "predicted": predicted_rows}
    return MethodResult(method, NAMES[:2], "accuracy", matrix, {"seed": 0}, items)


def _majority_predictor():
    return _classification("naive", [[[1] * 6, [0] * 6], [[0] * 6, [0] * 6], [[0] * 6, [1] * 6]])


def _learner():
    right = [list(g) for g in GOLD]
    return _classification("replay", [[[1] * 6, [0] * 6], [right[0], [0] * 6], [right[0], right[1]]])


def test_balanced_accuracy_and_majority_rate_by_hand():
    from metakv_cl.metrics import balanced_accuracy, majority_rate

    # class 0: 2 of 4 right, class 1: 1 of 2 right -> (0.5 + 0.5) / 2; plain accuracy would be 3/6
    assert balanced_accuracy([0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]) == pytest.approx(0.5)
    assert balanced_accuracy([0] * 6, GOLD[0]) == pytest.approx(0.5)  # one class always: 1 / classes
    assert balanced_accuracy([0, 0, 1], [0, 0, 1]) == 1.0
    assert majority_rate(GOLD[0]) == pytest.approx(4 / 6) and majority_rate(GOLD[1]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="equally many"):
        balanced_accuracy([0], [0, 1])


def test_did_not_learn_flags_a_majority_predictor_and_not_a_learner(tmp_path):
    lazy, good = _majority_predictor(), _learner()
    rows = lazy.task_rows()
    assert [row["accuracy"] for row in rows] == pytest.approx([4 / 6, 5 / 6])
    assert [row["balanced_accuracy"] for row in rows] == pytest.approx([0.5, 0.5])
    assert [row["chance"] for row in rows] == [0.5, 0.5]
    assert [row["majority_rate"] for row in rows] == pytest.approx([4 / 6, 5 / 6])
    assert lazy.did_not_learn() == NAMES[:2] and good.did_not_learn() == []

    table = format_table([lazy, good])
    lines = table.splitlines()
    assert "| did not learn |" in lines[0]
    assert lines[2].startswith("| naive | accuracy | 0.750 [") and "| **all 2** |" in lines[2]
    assert lines[3].startswith("| replay | accuracy | 1.000 [1.000, 1.000] |") and "| none |" in lines[3]
    assert "**naive learned none of its 2 trained experiences**" in table and "replay learned none" not in table

    paths = write_report([lazy, good], tmp_path)
    text = paths["json"].read_text()
    assert "[0, 0, 0, 0, 1, 1]," in text  # compact: one line per experience's items, not per item
    report = json.loads(text)
    assert report["did_not_learn"] == {"naive": NAMES[:2], "replay": []}
    assert report["methods"][0]["tasks"][1]["did_not_learn"] is True
    assert report["methods"][0]["intervals"]["method"]["average"]["low"] <= 0.75
    markdown = paths["markdown"].read_text()
    assert "| naive | cities | 0.833 | 0.500 | 0.500 | 0.833 | **did not learn** |" in markdown
    assert "| replay | cities | 1.000 | 1.000 | 0.500 | 0.833 |  |" in markdown


def test_per_item_outcomes_round_trip_and_old_results_still_load():
    result = _learner()
    restored = MethodResult.from_json(json.dumps(result.to_json()))
    assert restored.items == result.items and restored.matrix == result.matrix
    old = {key: value for key, value in result.to_json().items() if key not in ("items", "intervals", "tasks")}
    loaded = MethodResult.from_json(old)  # a results file written before per-item outcomes
    assert loaded.items is None and loaded.did_not_learn() == []
    assert "did not learn" not in format_table([loaded]) and "[" not in format_table([loaded])
    assert loaded.task_rows()[0] == {"experience": "people", "accuracy": 1.0}
    with pytest.raises(ValueError, match="one row per matrix row"):
        MethodResult("x", NAMES[:2], "accuracy", result.matrix[:2], items=result.items)
    with pytest.raises(ValueError, match="items per experience"):
        MethodResult("x", NAMES[:2], "accuracy", result.matrix,
                     items={**result.items, "predicted": [[[0] * 6, [0] * 5]] * 3})


def test_seed_report_gives_intervals_and_holm_adjusted_differences_to_a_reference(tmp_path):
    seeds = [[_majority_predictor(), _learner()] for _ in range(2)]
    paths = write_seed_report(seeds, tmp_path, title="toy", reference="naive")
    markdown = paths["markdown"].read_text()
    assert "## 95% intervals" in markdown and "| replay | 1.000 [1.000, 1.000] |" in markdown
    assert "## Difference to naive (method minus naive)" in markdown
    difference = next(line for line in markdown.splitlines() if line.startswith("| replay | 0.250 ["))
    report = json.loads(paths["json"].read_text())
    p_holm = report["intervals"]["holm"]["replay"]["average"]
    assert f"| {p_holm:.3g} |" in difference and 0 < p_holm <= 1
    assert report["intervals"]["differences"]["replay"]["average"]["estimate"] == pytest.approx(0.25)
    assert "**naive did not learn people, cities**" in markdown
    assert report["did_not_learn"] == {"naive": NAMES[:2], "replay": []}
    with pytest.raises(ValueError, match="reference 'ewc' is not a method with per-item outcomes"):
        write_seed_report(seeds, tmp_path, title="toy", reference="ewc")


def test_the_printed_comparison_shows_intervals_flags_and_the_per_experience_table(tmp_path):
    from metakv_cl.training.runner import finish_report

    printed = []
    table = finish_report([_majority_predictor(), _learner()], tmp_path, echo=printed.append)
    assert printed[0] == table and printed[1] == f"report: {tmp_path / 'report.md'}"
    assert "| naive | accuracy | 0.750 [" in table and "**naive learned none of its 2 trained experiences**" in table
    assert "| naive | people | 0.667 | 0.500 | 0.500 | 0.667 | **did not learn** |" in table


def test_generative_exact_match_is_reported_beside_accuracy(tmp_path):
    from metakv_cl.report import item_outcomes

    learner = _learner()
    assert learner.exact_match_matrix is None and "exact match" not in format_table([learner])
    # rows of R: before training, after people, after cities; each a bool per test item
    decoded = [[[False] * 6, [False] * 6], [[True] * 3 + [False] * 3, [False] * 6],
               [[True] * 6, [True] * 2 + [False] * 4]]
    evaluations = [[{"gold": gold, "predicted": predicted, "num_choices": 2, "generated_correct": correct}
                    for gold, predicted, correct in zip(GOLD, row, correct_row)]
                   for row, correct_row in zip(learner.items["predicted"], decoded)]
    items = item_outcomes("accuracy", evaluations)
    assert items == {**learner.items, "generated_correct": decoded}
    result = MethodResult("replay", NAMES[:2], "accuracy", learner.matrix, {"seed": 0}, items)
    assert result.exact_match_matrix == [[0.0, 0.0], [0.5, 0.0], [1.0, pytest.approx(1 / 3)]]

    data = result.to_json()
    assert data["exact_match"]["summary"]["average"] == pytest.approx(2 / 3)
    assert data["exact_match"]["summary"]["forgetting"] == pytest.approx(-0.5)  # 0.5 after people, 1.0 at the end
    assert MethodResult.from_json(json.loads(json.dumps(data))).items == items
    assert [row["exact_match"] for row in result.task_rows()] == pytest.approx([1.0, 1 / 3])

    table = format_table([result, _majority_predictor()])
    assert "| exact match |" in table.splitlines()[0]
    assert "| 0.667 | none |" in table.splitlines()[2] and "| – | **all 2** |" in table.splitlines()[3]
    markdown = write_report([result], tmp_path)["markdown"].read_text()
    assert "| replay | cities | 1.000 | 1.000 | 0.500 | 0.833 | 0.333 |  |" in markdown
    assert "| after 1: people | 0.500 | 0.000 |" in markdown  # the exact-match matrix under R
    seeds = write_seed_report([[result], [result]], tmp_path / "seeds", title="toy")["markdown"].read_text()
    assert "| replay | cities | 1.000 | 1.000 | 0.500 | 0.833 | 0.333 |  |" in seeds
    assert "| FWT | exact match | wall time (s) |" in seeds and "| 0.667 ± 0.000 |" in seeds
    with pytest.raises(ValueError, match=r"items\['generated_correct'\] needs one row per matrix row"):
        MethodResult("x", NAMES[:2], "accuracy", learner.matrix, items={**items, "generated_correct": decoded[:2]})
