"""The kv-eval and niah commands on a tiny random GPT-2 and real WikiText (skipped when the data is absent)."""

import json

import pytest
import torch

from kv_helpers import DATA_ROOT, WIKITEXT
from metakv_cl.kv.evaluate import long_articles, main, needle_samples, niah_main, parse_method_options, wikitext_articles

needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data/wikitext2/valid.txt is absent")


@needs_wikitext
def test_wikitext_articles_split_at_titles():
    articles = wikitext_articles(WIKITEXT)
    assert len(articles) > 50
    assert all(article.startswith(" = ") and not article.startswith(" = = ") for article in articles)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="WikiText file not found"):
        wikitext_articles(tmp_path / "valid.txt")
    with pytest.raises(SystemExit):
        main(["--model", "gpt2-tiny-random", "--data-root", str(tmp_path), "--out-dir", str(tmp_path)])


def test_data_root_takes_a_text_file_or_a_folder_of_articles(tmp_path):
    folder = tmp_path / "articles"
    folder.mkdir()
    (folder / "b.txt").write_text("second article")
    (folder / "a.txt").write_text("first article")
    assert long_articles(folder) == ["first article", "second article"]
    plain = tmp_path / "one.txt"
    plain.write_text("a single long article\nwith two lines")
    assert long_articles(plain) == ["a single long article\nwith two lines"]
    titled = tmp_path / "wiki.txt"
    titled.write_text(" = First = \n text one\n = = Section = = \n more\n = Second = \n text two\n")
    assert long_articles(titled) == [" = First = \n text one\n = = Section = = \n more", " = Second = \n text two"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .txt articles"):
        long_articles(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a text file nor a folder"):
        long_articles(tmp_path / "missing")

def test_bad_options_are_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--methods", "nope", "--out-dir", str(tmp_path)])
    assert "unknown KV compaction method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--budgets", "0.5,2", "--out-dir", str(tmp_path)])
    assert parse_method_options(["attention_matching.selection=omp", "h2o.recent_fraction=0.25"]) == {
        "attention_matching": {"selection": "omp"}, "h2o": {"recent_fraction": 0.25}}
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_method_options(["selection=omp"])


@needs_wikitext
def test_kv_eval_writes_results_and_a_plot(tmp_path):
    status = main([
        "--model", "gpt2-tiny-random", "--data-root", str(DATA_ROOT), "--out-dir", str(tmp_path),
        "--articles", "2", "--context", "96", "--continuation", "24", "--budgets", "0.5,0.25",
        "--methods", "full,attention_matching,int8", "--chunk-size", "8",
        "--method-option", "attention_matching.selection=omp", "--device", "cpu",
    ])
    assert status == 0
    report = json.loads((tmp_path / "kv_eval.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in report["results"]}
    assert set(rows) == {("full", 1.0), ("attention_matching", 0.5), ("attention_matching", 0.25), ("int8", 0.5),
                         ("int8", 0.25)}
    assert rows[("full", 1.0)]["peak_fraction_of_full"] == 1.0
    for (method, budget), row in rows.items():
        assert row["scored_tokens"] == 2 * 24 and row["perplexity"] > 1
        if method != "full":
            assert row["max_tokens"] == round(budget * 96) and row["peak_fraction_of_full"] < 0.75
            assert row["compactions"] > 0 and row["tokens_per_second"] > 0
    assert (tmp_path / "kv_eval.png").stat().st_size > 10_000


@needs_wikitext
def test_needles_sit_at_their_depth():
    from metakv_cl import hub

    tokenizer = hub.offline_gpt2_tokenizer()
    haystack = tokenizer(wikitext_articles(WIKITEXT)[1], add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        contexts, questions, codes = needle_samples(tokenizer, haystack, 128, depth, samples=3, seed=0)
        assert contexts.shape[1] + questions.shape[1] == 128 and len(set(codes)) == 3
        for context, code in zip(contexts, codes):
            text = tokenizer.decode(context)
            position = text.index(f"passcode is {code}.") / len(text)
            assert abs(position - depth) < 0.15
    with pytest.raises(ValueError, match="too short"):
        needle_samples(tokenizer, haystack, 10, 0.5, samples=1, seed=0)


@needs_wikitext
def test_niah_writes_accuracy_and_a_heatmap(tmp_path):
    status = niah_main([
        "--model", "gpt2-tiny-random", "--data-root", str(DATA_ROOT), "--out-dir", str(tmp_path),
        "--methods", "full,h2o", "--budgets", "0.25", "--lengths", "64,96", "--depths", "0,1",
        "--samples", "2", "--chunk-size", "16", "--device", "cpu", "--meta-kv", "mean",
    ])
    assert status == 0
    report = json.loads((tmp_path / "niah.json").read_text())
    assert report["config"]["meta_kv"] == "mean"
    assert len(report["results"]) == 2 * 2 * 2  # (full, h2o) x lengths x depths
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["answers"]) == 2 for r in report["results"])
    assert (tmp_path / "niah.png").stat().st_size > 10_000
    assert torch.tensor([r["peak_bytes"] for r in report["results"] if r["method"] == "h2o"]).max() < min(
        r["peak_bytes"] for r in report["results"] if r["method"] == "full")


def test_kv_eval_reports_both_protocols_on_a_folder_of_articles(tmp_path):
    from metakv_cl import hub

    hub.offline_gpt2_tokenizer()  # the tiny model's tokenizer; skips below if absent
    folder = tmp_path / "articles"
    folder.mkdir()
    for index in range(2):
        (folder / f"{index}.txt").write_text(" ".join(f"word{(index * 7 + i) % 50}" for i in range(400)))
    status = main([
        "--model", "gpt2-tiny-random", "--data-root", str(folder), "--out-dir", str(tmp_path / "out"),
        "--articles", "2", "--context", "96", "--continuation", "24", "--budgets", "0.25",
        "--methods", "full,h2o", "--chunk-size", "32", "--protocol", "oneshot,streaming", "--device", "cpu",
    ])
    assert status == 0
    rows = json.loads((tmp_path / "out" / "kv_eval.json").read_text())["results"]
    runs = {(r["protocol"], r["method"], r["budget"]) for r in rows}
    assert runs == {(p, m, b) for p in ("oneshot", "streaming") for m, b in (("full", 1.0), ("h2o", 0.25))}
    oneshot = {(r["method"], r["budget"]): r for r in rows if r["protocol"] == "oneshot"}
    assert all(r["scored_tokens"] == 2 * 24 and r["perplexity"] > 1 for r in rows)
    assert oneshot[("full", 1.0)]["cache_fraction_of_full"] == 1.0
    assert oneshot[("h2o", 0.25)]["cache_fraction_of_full"] <= 0.25 * (96 + 24) / 96
    # The full cache scores the same continuation alike under both protocols.
    streaming_full = next(r for r in rows if r["protocol"] == "streaming" and r["method"] == "full")
    assert abs(oneshot[("full", 1.0)]["nll_per_token"] - streaming_full["nll_per_token"]) < 1e-4
    with pytest.raises(SystemExit):
        main(["--protocol", "batch", "--out-dir", str(tmp_path)])


def test_skipped_articles_are_the_next_long_enough_ones():
    """``--skip-articles`` passes over the first long-enough articles (short ones never count)."""
    from metakv_cl.kv.evaluate import article_windows

    class Characters:  # a tokenizer with one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    articles = ["aaaaaa", "bb", "cccccc", "dddddd", "eeeeee"]
    windows = article_windows(Characters(), articles, 4, 2, skip=1)
    assert [chr(row[0]) for row in windows.tolist()] == ["c", "d"]
    assert torch.equal(article_windows(Characters(), articles, 4, 2), article_windows(Characters(), articles, 4, 2, skip=0))
    with pytest.raises(ValueError, match="only 4 articles have 4 tokens, 5 are needed"):
        article_windows(Characters(), articles, 4, 2, skip=3)
