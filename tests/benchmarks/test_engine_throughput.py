"""The engine-throughput benchmark on a tiny CPU model: same batches on every path, JSON and its page."""

import json

import pytest

from metakv_cl.benchmarks import engine_throughput


def test_every_path_trains_the_same_batches_and_the_page_is_rendered_from_the_json(tmp_path):
    out = tmp_path / "throughput"
    result = engine_throughput.main([
        "--documents", "16", "--batch-size", "4", "--rounds", "1", "--threads", "1",
        "--presets", "naive", "replay", "--eval-batch-size", "8", "--out", str(out),
    ])
    paths = result["paths"]
    assert list(paths) == ["bare padded", "bare packed", "engine naive", "engine replay"]
    # 2 experiences x 4 batches, the first of each untimed: the engine's naive fit sees the bare loop's batches
    assert paths["engine naive"]["timed_tokens"] == paths["bare packed"]["timed_tokens"] == paths["bare padded"]["timed_tokens"]
    assert paths["engine replay"]["timed_tokens"] > paths["engine naive"]["timed_tokens"]  # replayed items
    assert result["reference"] == "bare packed" and paths["bare packed"]["ratio"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in paths.values())
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["command"].startswith("python ") and saved["versions"]["torch"]
    page = out.with_suffix(".md").read_text()
    assert page == engine_throughput.render_markdown(saved)
    evaluation = result["evaluation"]  # every training document scored: its tokens but the first
    documents = result["documents"]
    assert evaluation["scored_tokens"] == round(result["document_tokens"]["mean"] * documents) - documents
    assert evaluation["scored_tokens_per_s"] > 0 and f"{evaluation['scored_tokens_per_s']:,.0f} scored tokens/s" in page
    row = next(line for line in page.splitlines() if line.startswith("| engine naive |"))
    assert f"{paths['engine naive']['tokens_per_s']:,.0f}" in row and f"{paths['engine naive']['ratio']:.2f}" in row


def test_a_pack_length_shorter_than_a_document_is_refused():
    with pytest.raises(ValueError, match=r"--pack-length 8 is shorter than the longest document \(\d+ tokens\)"):
        engine_throughput.main(["--documents", "4", "--rounds", "1", "--pack-length", "8", "--presets", "naive"])
