"""The padding benchmark on small subsets of a real downstream order (skipped without the shared data)."""

import json

import pytest

from metakv_cl.benchmarks import padding
from metakv_cl.data.dbpedia import default_data_root

needs_data = pytest.mark.skipif(not (default_data_root() / "cl_benchmark").is_dir(),
                                reason="../shared/data/cl_benchmark is absent")


@needs_data
def test_bucketed_and_length_ordered_batches_pad_less_and_the_json_is_what_was_printed(tmp_path, capsys):
    out = tmp_path / "padding.json"
    result = padding.main(["--max-train", "64", "--max-test", "48", "--token-budget", "1024", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert list(result["tasks"]) == ["dbpedia", "amazon", "qqp (yahoo substitute)", "agnews"]
    for row in result["tasks"].values():
        assert row["train_bucketed"] < row["train_shuffled"] / 2
        assert row["eval_by_length"] < row["eval_test_order"]
        assert row["train_shuffled_batches"] == 4 and row["eval_test_order_batches"] == row["eval_by_length_batches"] == 2
    assert f"| agnews | {result['tasks']['agnews']['train_shuffled']:.1%} (4) |" in capsys.readouterr().out
