"""The long-context benchmark end to end on a tiny random Llama and a small WikiText-style file (CPU)."""

import json
import math
import random

import pytest
import torch

from metakv_cl.benchmarks.long_context import bucket_edges, main, matched_lora, split_articles
from metakv_cl.testing import tiny_llama

WORDS = "the of river castle battle song album church road species storm game army city king".split()


def wikitext_file(path, articles=6, words=120):
    """Articles in WikiText layout: a `` = Title = `` line, then paragraphs."""
    rng = random.Random(0)
    lines = []
    for index in range(articles):
        lines += [f" = Article {index} = ", "", " " + " ".join(rng.choice(WORDS) for _ in range(words)) + " ", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def restore_threads():
    """The benchmark sets torch's thread count (--threads); give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run_writes_finite_bucket_perplexities_and_plots(tmp_path, restore_threads):
    out = tmp_path / "out"
    code = main([
        "--model", "tiny-llama", "--wikitext", str(wikitext_file(tmp_path / "valid.txt")), "--out-dir", str(out),
        "--rank", "4", "--state-dim", "8", "--held-out", "2", "--buckets", "0,16,32,64,128", "--window", "32",
        "--steps", "2", "--batch-size", "2", "--kv-methods", "h2o,attention_matching", "--kv-budget", "32",
        "--kv-chunk", "8", "--entropy-articles", "1", "--entropy-tokens", "32", "--device", "cpu",
        "--threads", "1",  # tiny models run fastest on one thread (and the CPU is shared)
    ])
    assert code == 0
    report = json.loads((out / "long_context.json").read_text())
    assert {"command", "commit", "gpu", "date", "versions", "settings"} <= set(report["meta"])
    assert report["errors"] == {}
    results = {r["variant"]: r for r in report["variants"]}
    assert list(results) == ["plain", "meta-kv-mean", "meta-kv-attentive", "meta-kv-recurrent", "lora"]
    buckets = ["0-16", "16-32", "32-64", "64-128", "all"]
    for r in results.values():
        tables = [r["full_context"], r["compacted"]["h2o"], r["compacted"]["attention_matching"]]
        for rows in tables:
            assert [row["bucket"] for row in rows] == buckets
            assert all(math.isfinite(row["perplexity"]) and row["tokens"] > 0 for row in rows)
            assert rows[0]["tokens"] == 2 * 15 and rows[-1]["tokens"] == 2 * 127  # token 0 is never scored
        assert len(r["attention_entropy"]) == 2 and all(e > 0 for e in r["attention_entropy"])
    for name in ("meta-kv-mean", "meta-kv-attentive", "meta-kv-recurrent", "lora"):
        r = results[name]
        assert r["exactness_max_abs_diff"] <= 1e-5
        assert r["training"]["steps"] == 2 and all(math.isfinite(loss) for loss in r["training"]["losses"])
        # every adapter within 10 % of the budget set by the first source
        assert abs(r["trainable_parameters"] - r["parameter_budget"]) <= 0.1 * r["parameter_budget"]
    # below the cache budget nothing is compacted: streaming the buckets must equal the full context
    for bucket in (0, 1):
        full = results["plain"]["full_context"][bucket]["nll"]
        assert results["plain"]["compacted"]["h2o"][bucket]["nll"] == pytest.approx(full, rel=1e-4)
    assert (out / "long_context_perplexity.png").stat().st_size > 0
    assert (out / "long_context_entropy.png").stat().st_size > 0
    table = (out / "long_context.md").read_text()
    assert "| meta-kv-recurrent |" in table and "compacted cache: h2o, 32 tokens" in table


def test_matched_lora_picks_the_closest_count():
    model = tiny_llama()  # hidden 64, K/V 32 features: q/o rank-1 cost 128, k/v 96
    targets, rank = matched_lora(model, budget=2 * 448 * 5)  # q,k,v,o: 448 per rank per layer, 2 layers
    assert targets == ("q_proj", "k_proj", "v_proj", "o_proj") and rank == 5


def test_bad_buckets_and_too_few_long_articles_are_clear_errors():
    assert bucket_edges("0,4,8") == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="increasing"):
        bucket_edges("4,8")
    with pytest.raises(ValueError, match="cannot hold out 3"):
        split_articles(["a" * 10, "b" * 10, "c" * 3], lambda text: list(text.encode()), 8, 3, seed=0)
    split = split_articles(["a" * 10, "b" * 10, "c" * 3], lambda text: list(text.encode()), 8, 1, seed=0)
    assert split.held_out.shape == (1, 8) and split.train_tokens.numel() == 13
