"""benchmarks/kv_eval_table.py: tables read off kv-eval JSON, the best per budget and issue 20's verdict."""

import json

import pytest

from metakv_cl.benchmarks.kv_eval_table import main, tables


def write(path, rows):
    path.write_text(json.dumps({"config": {}, "results": rows}))
    return str(path)


def row(method, budget, perplexity, fraction=None):
    return {"method": method, "budget": budget, "perplexity": perplexity,
            "cache_fraction_of_full": budget if fraction is None else fraction}


def test_tables_bold_the_best_repeat_the_full_cache_and_give_the_verdict(tmp_path):
    first = write(tmp_path / "a.json", [row("full", 1.0, 20.0), row("h2o", 0.5, 21.0), row("h2o", 0.1, 22.0)])
    second = write(tmp_path / "b.json", [row("mix", 0.5, 20.5), row("mix", 0.1, 20.9, 0.1004)])
    text = tables([f"{first}#full", f"{first}#h2o", f"{second}#=mixed (ours)"])
    assert "| full | 20.00 | 20.00 |" in text
    assert "| h2o | 21.00 | 22.00 |" in text
    assert "| mixed (ours) | **20.50** | **20.90** |" in text
    assert "| mixed (ours) | 0.5000 | 0.1004 |" in text
    assert "- 0.1: mixed (ours) (20.90, +4.5 % against the full cache)" in text
    assert "One method lowest at every budget: yes, mixed (ours)." in text
    assert "within 5 % of the full cache (21.00): yes (mixed (ours), 20.90)." in text


def test_a_method_lowest_at_some_budgets_only_fails_the_target(tmp_path, capsys):
    path = write(tmp_path / "a.json", [row("full", 1.0, 20.0), row("a", 0.5, 20.1), row("a", 0.1, 25.0),
                                       row("b", 0.5, 20.2), row("b", 0.1, 23.0)])
    assert main([f"{path}#full", f"{path}#a", f"{path}#b"]) == 0
    text = capsys.readouterr().out
    assert "One method lowest at every budget: no." in text and ": no (b, 23.00)." in text


def test_a_file_of_several_methods_needs_one_named(tmp_path):
    path = write(tmp_path / "a.json", [row("a", 0.5, 20.1), row("b", 0.5, 20.2)])
    with pytest.raises(ValueError, match="name one"):
        tables([path])
    with pytest.raises(ValueError, match="no rows of 'c'"):
        tables([f"{path}#c"])
