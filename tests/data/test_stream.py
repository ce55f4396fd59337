"""Task lists to Avalanche benchmarks: items, overflow policies, classification layout, errors."""

import pytest
import torch
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.utils.data import AvalancheDataset

from metakv_cl.data import (
    IGNORE_INDEX,
    ClassificationTask,
    CompactVocabulary,
    TaskStream,
    TextTask,
    classification_task_from_hf_dataset,
    make_benchmark,
    text_task_from_files,
    text_task_from_hf_dataset,
    word_level_tokenizer,
)

TEXTS = ["the cat sat on the mat", "a dog ran far away from the cat", "one two three four five six seven eight nine one two three"]


@pytest.fixture
def tokenizer():
    return word_level_tokenizer(TEXTS + ["good bad film Answer : positive negative very"])


def lm_tasks():
    return [TextTask("animals", train=TEXTS[:2], test=["the cat ran"]), TextTask("numbers", train=TEXTS[2:], test=["one two"])]


def test_benchmark_is_an_avalanche_scenario_of_token_dicts(tokenizer):
    benchmark = make_benchmark(lm_tasks(), tokenizer, max_length=32)
    assert isinstance(benchmark, CLScenario)
    assert benchmark.experience_names == ["animals", "numbers"] and benchmark.score_name == "loss"
    assert [e.current_experience for e in benchmark.train_stream] == [0, 1]
    dataset = benchmark.train_stream[0].dataset
    assert isinstance(dataset, AvalancheDataset) and len(dataset) == 2
    item = dataset[1]
    expected = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["input_ids"].tolist() == expected and torch.equal(item["labels"], item["input_ids"])
    assert int(item["experience"]) == 0
    batch = dataset.collate_fn([dataset[0], dataset[1]])
    shorter = len(dataset[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * shorter + [0] * (len(expected) - shorter)
    assert (batch["labels"][0, shorter:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("policy, lengths", [("truncate", [9]), ("chunk", [9, 4])])
def test_overflow_truncates_or_chunks(tokenizer, policy, lengths):
    benchmark = make_benchmark(lm_tasks(), tokenizer, max_length=9, overflow=policy)
    numbers = benchmark.train_stream[1].dataset  # 12 words + EOS = 13 tokens
    assert [len(item["input_ids"]) for item in numbers] == lengths


def test_overflow_error_names_experience_text_and_lengths(tokenizer):
    with pytest.raises(ValueError, match=r"experience 1 \('numbers'\): train text 0 has 13 tokens, more than the limit of 9"):
        make_benchmark(lm_tasks(), tokenizer, max_length=9, overflow="error")


def test_classification_trains_on_the_label_and_tests_every_candidate(tokenizer):
    task = ClassificationTask(
        "sentiment", train=[("good film", "positive")], test=[("bad film", "negative")],
        labels=["positive", "negative", "very positive"],
    )
    benchmark = make_benchmark([task], tokenizer, max_length=32)
    assert benchmark.score_name == "accuracy"
    train = benchmark.train_stream[0].dataset[0]
    prompt = tokenizer(task.prompt("good film"), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert train["input_ids"].tolist() == prompt + answer
    assert train["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + answer
    test = benchmark.test_stream[0].dataset[0]
    assert test["choice_input_ids"].shape[0] == 3 and int(test["target"]) == 1
    for row, label in enumerate(task.labels):
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        scored = test["choice_labels"][row][test["choice_labels"][row] != IGNORE_INDEX].tolist()
        assert scored == tokens
    assert test["choice_attention_mask"][0].sum() < test["choice_attention_mask"][2].sum()  # "very positive" is longer


def test_long_classification_prompt_keeps_its_end(tokenizer):
    task = ClassificationTask("s", train=[(" ".join(["film"] * 20), "positive")], test=[("good", "negative")],
                              labels=["positive", "negative"])
    benchmark = make_benchmark([task], tokenizer, max_length=8, overflow="truncate")
    item = benchmark.train_stream[0].dataset[0]
    assert len(item["input_ids"]) == 8
    cue = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    kept = item["input_ids"][item["labels"] == IGNORE_INDEX].tolist()
    assert kept[-len(cue):] == cue  # the answer cue survives, the start of the text does not


def test_empty_or_mixed_streams_are_refused(tokenizer):
    with pytest.raises(ValueError, match="task list is empty"):
        make_benchmark([], tokenizer)
    with pytest.raises(ValueError, match=r"experience 0 \('blank'\): the train split has no text"):
        make_benchmark([TextTask("blank", train=["   "], test=["the cat"])], tokenizer, append_eos=False)
    mixed = [lm_tasks()[0], ClassificationTask("s", [("good", "positive")], [("bad", "negative")], ["positive", "negative"])]
    with pytest.raises(ValueError, match="mixes task kinds"):
        make_benchmark(mixed, tokenizer)
    with pytest.raises(ValueError, match="unknown overflow policy 'wrap'"):
        make_benchmark(lm_tasks(), tokenizer, overflow="wrap")


def test_compact_vocabulary_keeps_the_segmentation_with_small_ids():
    from metakv_cl.hub import load_tokenizer

    gpt2 = load_tokenizer("gpt2")
    compact = CompactVocabulary(gpt2, TEXTS)
    ids = compact(TEXTS[0])["input_ids"]
    assert len(ids) == len(gpt2(TEXTS[0])["input_ids"]) and max(ids) < len(compact) < 60
    assert compact.decode(ids) == TEXTS[0]
    assert compact("zebra")["input_ids"][0] == CompactVocabulary.UNKNOWN
    assert compact.eos_token_id == compact.to_compact[gpt2.eos_token_id]


def test_task_stream_validates_loader_arguments_and_model_limit():
    # both are refused when the stream is configured, before anything loads
    with pytest.raises(ValueError, match="loader_args do not fit .*topics_count.*accepted arguments"):
        TaskStream(loader="metakv_cl.data.synthetic.synthetic_topic_tasks", loader_args={"topics_count": 2})
    with pytest.raises(ValueError, match="'metakv_cl.data.nowhere.tasks' is not a registered task loader"):
        TaskStream(loader="metakv_cl.data.nowhere.tasks")
    stream = TaskStream(tasks=[{"name": "a", "train": TEXTS, "test": TEXTS}], tokenizer="word-level", max_length=256)
    with pytest.raises(ValueError, match="max_length=256 exceeds the model's 128 positions"):
        stream.build(model_max_positions=128)
    warmed = TaskStream(tasks=[{"name": n, "train": TEXTS, "test": TEXTS} for n in "abc"], tokenizer="word-level",
                        warmup_experiences=1)
    benchmark = warmed.build(model_max_positions=64)
    assert benchmark.experience_names == ["b", "c"] and len(benchmark.warmup_stream) == 1


def test_text_and_hf_sources(tmp_path):
    (tmp_path / "train.txt").write_text("first text\n\nsecond text\n")
    (tmp_path / "test.txt").write_text("held out\n")
    task = text_task_from_files("files", tmp_path / "train.txt", tmp_path / "test.txt")
    assert list(task.train) == ["first text", "second text"] and list(task.test) == ["held out"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_task_from_files("files", tmp_path / "missing.txt", tmp_path / "test.txt")
    rows = {"train": [{"text": "a b", "label": 0}, {"text": "c d", "label": 1}], "test": [{"text": "e", "label": 1}]}
    assert list(text_task_from_hf_dataset("hf", rows).train) == ["a b", "c d"]
    classification = classification_task_from_hf_dataset("hf", rows, "text", "label", label_names=["no", "yes"])
    assert list(classification.test) == [("e", "yes")] and list(classification.labels) == ["no", "yes"]
    with pytest.raises(KeyError, match="no column 'body'"):
        text_task_from_hf_dataset("hf", rows, text_column="body")
