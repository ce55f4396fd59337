"""RULER-style tasks: the generator, RULER's scoring, and the one-shot sweep on a tiny random GPT-2 (real WikiText)."""

import json
import re
from collections import Counter

import pytest
import torch

from kv_helpers import DATA_ROOT, WIKITEXT
from metakv_cl.kv.ruler import TASKS, RulerGenerator, score_prediction

needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data/wikitext2/valid.txt is absent")
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")


@pytest.fixture(scope="module")
def tiny():
    """The tiny random GPT-2 with the real GPT-2 tokenizer, and a generator over WikiText-2."""
    if not WIKITEXT.is_file():
        pytest.skip("../shared/data/wikitext2/valid.txt is absent")
    from metakv_cl.kv.evaluate import load_model, long_articles, ruler_generator

    model, tokenizer = load_model("gpt2-tiny-random")
    return model, tokenizer, ruler_generator(tokenizer, long_articles(DATA_ROOT))


def test_scoring_follows_ruler_string_match():
    assert score_prediction(" 1234567.", ["1234567"], "all") == 1.0
    assert score_prediction("12345", ["1234567"], "all") == 0.0  # a prefix of the answer is not the answer
    assert score_prediction("ABCDE, fghij and more", ["abcde", "FGHIJ", "KLMNO", "PQRST"], "all") == 0.5
    assert score_prediction("ABCDE, fghij", ["abcde", "KLMNO"], "part") == 1.0
    assert score_prediction("nothing here", ["abcde", "KLMNO"], "part") == 0.0
    assert score_prediction("\x00 seven\x1f", ["seven"], "all") == 1.0  # control characters are separators
    with pytest.raises(ValueError, match="unknown metric"):
        score_prediction("x", ["x"], "any")
    with pytest.raises(ValueError, match="at least one gold answer"):
        score_prediction("x", [], "all")


def test_examples_are_deterministic_and_exactly_the_length(tiny):
    _, tokenizer, generator = tiny
    for task in TASKS:
        first = generator.examples(task, 512, 3, seed=4)
        assert first == generator.examples(task, 512, 3, seed=4)
        assert [e.context_ids for e in first] != [e.context_ids for e in generator.examples(task, 512, 3, seed=5)]
        # example i depends on the seed, the task and i only
        assert first[1] == generator.examples(task, 512, 2, seed=4)[1]
        for example in first:
            if task == "common_words_extraction":
                assert 512 - 3 * 8 <= example.length <= 512  # short by less than one uncommon word's 3 entries
            else:
                assert example.length == 512
            assert tokenizer.decode(example.question_ids) == example.question
            assert example.question.endswith(("is", "are", "are:"))


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_the_queried_needle_sits_at_its_depth(tiny, task):
    _, tokenizer, generator = tiny
    depths = (0.0, 0.3, 0.5, 0.9, 1.0)
    for example in generator.examples(task, 1024, 5, seed=0, depths=depths):
        assert example.depth == depths[example.index]
        assert abs(example.needle_offset / len(example.context_ids) - example.depth) < 0.08
        needle = tokenizer.decode(example.context_ids[example.needle_offset:example.needle_offset + 24])
        assert example.answers[0] in needle
        assert all(answer in example.context for answer in example.answers)
        if task.startswith("niah"):
            key = re.search(r"for (\S+) mentioned", example.question).group(1)
            keys = re.findall(r"magic numbers for (\S+) is: (\d+)\.", example.context)
            assert sorted(value for k, value in keys if k == key) == sorted(example.answers)
            assert len({k for k, _ in keys}) == (4 if task == "niah_multikey" else 1)
        else:  # the chain reads in order and every variable on it holds the value
            chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", example.context)
            assert [name for name, _ in chain] == list(example.answers)
            assert [source for _, source in chain[1:]] == list(example.answers[:-1])


def test_common_words_are_the_most_frequent_entries(tiny):
    _, _, generator = tiny
    for example in generator.examples("common_words_extraction", 1024, 2, seed=1):
        entries = re.findall(r" (\d+)\. (\w+)", example.context)
        assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        assert len(example.answers) == 10
        assert min(counts[w] for w in example.answers) > max(c for w, c in counts.items() if w not in example.answers)


def test_bad_requests_are_clear_errors(tiny):
    _, tokenizer, generator = tiny
    with pytest.raises(ValueError, match="unknown RULER task"):
        generator.examples("qa", 512, 1)
    with pytest.raises(ValueError, match="too short"):
        generator.examples("niah_multivalue", 64, 1)
    with pytest.raises(ValueError, match="depths must be in"):
        generator.examples("niah_single", 512, 1, depths=(1.5,))
    with pytest.raises(ValueError, match="at least 100 distinct words"):
        RulerGenerator(tokenizer, ["One sentence."], ["word"])


def test_oracle_answers_score_one_through_the_sweep(tiny, monkeypatch):
    """The sweep's decoding and scoring, fed the gold answers (a copy oracle) or another example's (all wrong)."""
    from metakv_cl.kv import evaluate
    from metakv_cl.kv.arguments import ruler_parser

    model, tokenizer, generator = tiny
    examples = [e for task in ("niah_single", "niah_multivalue", "variable_tracking", "common_words_extraction")
                for e in generator.examples(task, 320, 2, seed=0)]
    settings = evaluate._settings(ruler_parser().parse_args(["--out-dir", "unused"]))

    def sweep_answering(answers):
        """The sweep, with generation replaced by writing ``answers[i]`` for the i-th example (each method in turn)."""
        calls = iter(a for a in answers for _ in range(2))  # two runs per example: full and h2o

        def fake_generate(model, cache, question, **kwargs):
            answer = tokenizer(" " + ", ".join(next(calls)), add_special_tokens=False)["input_ids"]
            return torch.cat([question, torch.tensor([answer])], dim=1)

        monkeypatch.setattr(evaluate, "generate", fake_generate)
        return evaluate.ruler_sweep(model, tokenizer, examples, ["full", "h2o"], [0.5], settings, log=lambda _: None)

    records = sweep_answering([e.answers for e in examples])
    assert len(records) == len(examples) * 2 and all(r["score"] == 1.0 for r in records)
    rows = evaluate.ruler_scores(records)
    assert {(r["task"], r["method"], r["budget"]) for r in rows} == {
        (t, m, b) for t in ("niah_single", "niah_multivalue", "variable_tracking", "common_words_extraction")
        for m, b in (("full", 1.0), ("h2o", 0.5))}
    assert all(r["score"] == r["score_low"] == r["score_high"] == 1.0 and r["examples"] == 2 for r in rows)
    assert all(r["cache_fraction_of_full"] == 1.0 for r in rows if r["method"] == "full")
    assert all(r["cache_fraction_of_full"] <= 0.55 for r in rows if r["method"] == "h2o")

    # each example answered with the answers of its task's other example
    swapped = [next(o.answers for o in examples if o.task == e.task and o is not e) for e in examples]
    assert all(r["score"] == 0.0 for r in sweep_answering(swapped))


def test_a_budget_of_one_answers_as_the_full_cache(tiny):
    from metakv_cl.kv import evaluate
    from metakv_cl.kv.arguments import ruler_parser

    model, tokenizer, generator = tiny
    examples = generator.examples("niah_single", 160, 2, seed=0) + generator.examples("variable_tracking", 160, 1, seed=0)
    settings = evaluate._settings(ruler_parser().parse_args(["--out-dir", "unused"]))
    methods = ["full", "attention_matching", "h2o", "snapkv", "sinks_window"]
    records = evaluate.ruler_sweep(model, tokenizer, examples, methods, [1.0, 0.25], settings, log=lambda _: None)
    answers = {(r["task"], r["index"], r["method"], r["budget"]): r["prediction"] for r in records}
    full = {(task, index): p for (task, index, method, _), p in answers.items() if method == "full"}
    assert all(p for p in full.values())
    for (task, index, method, budget), prediction in answers.items():
        if budget == 1.0:
            assert prediction == full[task, index], (method, task, index)
    # a quarter of the cache changes some answer of the untrained model (the comparison can fail)
    assert any(p != full[t, i] for (t, i, _, b), p in answers.items() if b == 0.25)


@needs_wikitext
def test_ruler_command_writes_scores_examples_and_a_heatmap(tmp_path, capsys):
    from metakv_cl.kv.evaluate import ruler_main

    argv = ["--model", "gpt2-tiny-random", "--data-root", str(DATA_ROOT), "--out-dir", str(tmp_path),
            "--tasks", "niah_single,common_words_extraction", "--lengths", "320", "--examples", "2",
            "--methods", "full,sinks_window", "--budgets", "0.5", "--device", "cpu"]
    assert ruler_main(argv) == 0
    report = json.loads((tmp_path / "ruler.json").read_text())
    assert report["config"]["command"] == "metakv-cl ruler " + " ".join(argv)
    assert {(r["task"], r["method"], r["budget"]) for r in report["results"]} == {
        (t, m, b) for t in ("niah_single", "common_words_extraction") for m, b in (("full", 1.0), ("sinks_window", 0.5))}
    assert all(r["examples"] == 2 and 0 <= r["score_low"] <= r["score"] <= r["score_high"] <= 1 for r in report["results"])
    assert len(report["examples"]) == 2 * 2 * 2 and all("prediction" in r for r in report["examples"])
    assert (tmp_path / "ruler.png").stat().st_size > 10_000
    page = (tmp_path / "ruler.md").read_text()
    assert report["config"]["command"] in page and "question-agnostic" in page
    full = next(r for r in report["results"] if r["method"] == "full" and r["task"] == "niah_single")
    assert f"| full | 1 | {full['score']:.2f} [{full['score_low']:.2f}, {full['score_high']:.2f}] |" in page
    for bad, message in ((["--tasks", "qa"], "unknown task 'qa'"), (["--depths", "2"], "--depths must be in [0, 1]"),
                         (["--lengths", "1k"], "--lengths must be comma-separated int values, got '1k'")):
        with pytest.raises(SystemExit):
            ruler_main(["--out-dir", str(tmp_path), "--model", "gpt2-tiny-random", *bad])
        assert message in capsys.readouterr().err


def test_question_aware_reads_the_question_before_compacting(tiny, monkeypatch):
    """Question-aware, the compacted prefill holds the context and the question but its last token,
    which alone is fed to decoding; question-agnostic, the whole question follows the compaction."""
    from metakv_cl.kv import evaluate
    from metakv_cl.kv.arguments import ruler_parser

    model, tokenizer, generator = tiny
    example = generator.examples("niah_single", 160, 1, seed=0)[0]
    settings = evaluate._settings(ruler_parser().parse_args(["--out-dir", "unused"]))
    seen = []

    def fake_generate(model, cache, question, **kwargs):
        seen.append((cache.seen_tokens, question[0].tolist()))
        return torch.cat([question, torch.tensor([[7]])], dim=1)

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    for aware in (False, True):
        evaluate.ruler_sweep(model, tokenizer, [example], ["snapkv"], [0.5], settings, log=lambda _: None,
                             question_aware=aware)
    context, question = len(example.context_ids), list(example.question_ids)
    assert seen == [(context, question), (context + len(question) - 1, question[-1:])]


def test_question_aware_at_budget_one_answers_as_the_full_cache(tiny):
    from metakv_cl.kv import evaluate
    from metakv_cl.kv.arguments import ruler_parser

    model, tokenizer, generator = tiny
    examples = generator.examples("niah_single", 160, 2, seed=0)
    settings = evaluate._settings(ruler_parser().parse_args(["--out-dir", "unused"]))
    methods = ["full", "snapkv", "h2o"]
    agnostic = evaluate.ruler_sweep(model, tokenizer, examples, ["full"], [1.0], settings, log=lambda _: None)
    aware = evaluate.ruler_sweep(model, tokenizer, examples, methods, [1.0, 0.25], settings, log=lambda _: None,
                                 question_aware=True)
    full = {r["index"]: r["prediction"] for r in agnostic}
    assert all(full.values())
    assert all(r["prediction"] == full[r["index"]] for r in aware if r["budget"] == 1.0)
