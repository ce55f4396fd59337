"""WikiText-2 warm-up task: detokenisation, paragraphs, splits, and the warm-up loader of a stream."""

import pytest

from metakv_cl.data import TaskStream
from metakv_cl.data.wikitext import detokenize_wikitext, wikitext_paragraphs, wikitext_tasks

SAMPLE = """ 
 = Homarus gammarus = 
 
 It may grow to a length of 60 cm ( 24 in ) and a mass of 6 @.@ 5 kilograms , and is blue @-@ black . 
 = = Description = = 
 The lobster 's claws are " large " ; it does n't swim . 
 Third paragraph here . 
"""


def write_sample(root):
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "valid.txt").write_text(SAMPLE)
    return root


def test_detokenize_undoes_wikitext_spacing():
    assert detokenize_wikitext(" a mass of 6 @.@ 5 kg ( 24 in ) , blue @-@ black . ") == "a mass of 6.5 kg (24 in), blue-black."
    assert detokenize_wikitext("The lobster 's claws do n't swim") == "The lobster's claws don't swim"


def test_paragraphs_drop_headings_and_blank_lines(tmp_path):
    paragraphs = wikitext_paragraphs(write_sample(tmp_path) / "wikitext2" / "valid.txt")
    assert len(paragraphs) == 3 and paragraphs[0].startswith("It may grow") and "=" not in "".join(paragraphs)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        wikitext_paragraphs(tmp_path / "missing.txt")


def test_task_split_and_subset(tmp_path):
    [task] = wikitext_tasks(root=write_sample(tmp_path), test_fraction=0.3)
    assert task.name == "WikiText-2" and len(task.train) == 2 and len(task.test) == 1
    with pytest.raises(ValueError, match="max_paragraphs"):
        wikitext_tasks(root=tmp_path, max_paragraphs=1)


def test_real_data(shared_data):
    [task] = wikitext_tasks(root=shared_data, max_paragraphs=200)
    assert len(task.train) + len(task.test) == 200 and " @-@ " not in " ".join(task.train)


def test_stream_warms_up_on_another_loader(tmp_path):
    root = write_sample(tmp_path)
    stream = TaskStream(
        loader="metakv_cl.data.synthetic.synthetic_topic_tasks",
        loader_args={"num_experiences": 2},
        warmup_loader="metakv_cl.data.wikitext.wikitext_tasks",
        warmup_loader_args={"root": str(root), "test_fraction": 0.3},
        tokenizer="word-level",
        max_length=64,
    )
    benchmark = stream.build()
    assert len(benchmark.experience_names) == 2 and "WikiText-2" not in benchmark.experience_names
    assert [info.name for info in benchmark.warmup_infos] == ["WikiText-2"] and stream.warmup_experiences == 1
    with pytest.raises(ValueError, match="either warmup_experiences .* or warmup_loader"):
        TaskStream(warmup_experiences=1, warmup_loader="metakv_cl.data.wikitext.wikitext_tasks")
