"""The retrieval-memory benchmark end to end on a tiny random Llama and a small WikiText-style file (CPU)."""

import json
import math
import random

import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the 'retrieval' extra)")

from metakv_cl.benchmarks.retrieval_memory import main  # noqa: E402

WORDS = "the of river castle battle song album church road species storm game army city king".split()


@pytest.fixture
def restore_threads():
    """The benchmark sets torch's thread count (--threads); give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run_writes_every_method_with_its_memory(tmp_path, restore_threads):
    rng = random.Random(0)
    lines = []
    for index in range(2):
        lines += [f" = Article {index} = ", "", " " + " ".join(rng.choice(WORDS) for _ in range(60)) + " ", ""]
    (tmp_path / "valid.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "retrieval.json"
    assert main(["--model", "tiny-llama", "--wikitext", str(tmp_path / "valid.txt"), "--out", str(out), "--articles", "2",
                 "--tokens", "160", "--score-tokens", "48", "--budget", "48", "--chunk", "16", "--rag-chunk", "16",
                 "--methods", "sliding_window,h2o", "--threads", "1", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    methods = [row["method"] for row in report["summary"]]
    assert methods == ["full", "sliding_window", "h2o", "knn_attention", "knn_lm", "rag"]
    assert len(report["rows"]) == 12 and all(row["scored_tokens"] == 48 for row in report["rows"])
    assert all(math.isfinite(row["perplexity"]) and row["memory_bytes"] > 0 for row in report["rows"])
    by_method = {row["method"]: row for row in report["summary"]}
    assert by_method["full"]["kv_bytes"] == 160 * report["kv_bytes_per_token"]
    assert by_method["h2o"]["kv_bytes"] < by_method["full"]["kv_bytes"]
    assert all(by_method[m]["store_bytes"] > 0 for m in ("knn_attention", "knn_lm", "rag"))
    assert report["command"].startswith("python benchmarks/retrieval_memory.py")


def test_a_rag_budget_without_local_tokens_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--out", str(tmp_path / "x.json"), "--budget", "128", "--rag-chunk", "64", "--rag-top-k", "2"])
    assert "must leave local tokens in --budget (128)" in capsys.readouterr().err
