"""The compaction-speed benchmark end to end on the tiny Llama shape (CPU), and its method specs."""

import json
import math

import pytest

from metakv_cl.benchmarks.compaction_speed import MethodSpec, main


def test_method_specs_carry_options_and_reject_bad_ones():
    spec = MethodSpec.parse("attention_matching:selection=omp:nnls_iterations=3")
    assert (spec.name, spec.options) == ("attention_matching", {"selection": "omp", "nnls_iterations": 3})
    assert spec.build().selection == "omp"
    with pytest.raises(ValueError, match="key=value"):
        MethodSpec.parse("h2o:recent_fraction")
    with pytest.raises(ValueError, match="unknown KV compaction method"):
        MethodSpec.parse("nope")
    with pytest.raises(ValueError, match="bad arguments"):
        MethodSpec.parse("h2o:no_such_option=1")


def test_tiny_run_writes_every_measurement_and_ends_with_the_table(tmp_path, capsys):
    out = tmp_path / "speed.json"
    methods = "attention_matching,attention_matching:selection=omp,h2o,sliding_window"
    status = main([
        "--shape", "tiny", "--device", "cpu", "--context", "160", "--budget", "0.1", "--repeats", "2", "--chunk", "64",
        "--prefill-tokens", "192", "--prefill-max-tokens", "48", "--prefill-chunk", "16", "--methods", methods,
        "--profile-dir", str(tmp_path / "profiles"), "--out", str(out),
    ])
    assert status == 0
    report = json.loads(out.read_text())
    assert {"device_name", "torch", "transformers", "commit", "date", "dtype"} <= set(report["environment"])
    assert report["environment"]["dtype"] == "float32"
    rows = {row["method"]: row for row in report["results"]}
    assert list(rows) == methods.split(",")
    for row in rows.values():
        assert row["layers"] == 2 and row["kv_heads"] == 2
        assert row["entries_before"] == 160 and row["entries_after"] == math.floor(0.1 * 160)
        assert len(row["compaction_seconds_all"]) == 2 and row["compaction_seconds"] > 0
        assert len(row["layer_loop_seconds_all"]) == 2 and row["layer_loop_seconds"] > 0
        assert row["default_path"] == "layer loop"  # what cache.compact does on the CPU
        assert row["prefill_tokens_per_second"] > 0 and row["prefill_compactions"] > 0
        assert row["compaction_host_syncs"] is None and row["compaction_peak_bytes"] is None  # CPU
    assert rows["attention_matching"]["reference_queries"] == 160 * 2  # two query heads per KV head
    assert rows["h2o"]["reference_queries"] is None
    assert len(list((tmp_path / "profiles").glob("profile_*.txt"))) == 4
    printed = capsys.readouterr().out.strip().splitlines()
    table = printed[-(len(rows) + 2):]
    assert table[0].startswith("| method |") and all(line.startswith("|") for line in table)
    assert table[-1].startswith("| sliding_window |")


def test_bad_arguments_are_command_line_errors():
    with pytest.raises(SystemExit):
        main(["--shape", "tiny", "--budget", "1.5"])
    with pytest.raises(SystemExit):
        main(["--shape", "tiny", "--methods", "attention_matching:selection"])
