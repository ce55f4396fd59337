"""Toy streams and models for tests, examples and smoke runs of the engine (no download, seconds on a CPU).

A toy stream is the synthetic topic stream with two entities per topic (42 training and 16 test
sentences per experience) and a word-level tokenizer fitted on it, so a tiny GPT-2 needs fewer
than 200 embeddings. The toy lookup stream (:func:`toy_lookup_setup`) is its classification
counterpart for retrieval: every label is drawn at random, so only a near-duplicate training item
tells a test item's label.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from metakv_cl.data.stream import LMBenchmark, TaskStream, make_benchmark, word_level_tokenizer
from metakv_cl.data.synthetic import synthetic_topic_tasks
from metakv_cl.data.tasks import ClassificationTask, TextTask
from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.testing import tiny_gpt2
from metakv_cl.training.module import ContinualLMModule

TOY_MODEL_SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64}


def toy_task_specs(num_experiences: int = 3, entities_per_topic: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """The toy stream as inline task dicts (``data.init_args.tasks`` of a config)."""
    tasks = synthetic_topic_tasks(num_experiences=num_experiences, entities_per_topic=entities_per_topic, seed=seed)
    return [{"name": t.name, "train": list(t.train), "test": list(t.test)} for t in tasks]


def toy_stream(num_experiences: int = 3, warmup_experiences: int = 0, **kwargs: Any) -> TaskStream:
    """A :class:`TaskStream` of the toy tasks with a word-level tokenizer."""
    return TaskStream(
        tasks=toy_task_specs(num_experiences + warmup_experiences),
        tokenizer="word-level",
        max_length=TOY_MODEL_SHAPE["n_positions"],
        warmup_experiences=warmup_experiences,
        **kwargs,
    )


def toy_setup(
    num_experiences: int = 3,
    *,
    meta_kv: MetaKVConfig | None = None,
    lr: float = 3e-3,
    warmup_experiences: int = 0,
    **model_overrides: Any,
) -> tuple[LMBenchmark, ContinualLMModule]:
    """(benchmark, module): the toy stream and a tiny randomly initialised GPT-2 that fits it.

    Args:
        num_experiences: experiences of the continual stream.
        meta_kv: add Meta-KV attention with this configuration.
        lr: learning rate.
        warmup_experiences: extra leading topics forming the warm-up stream.
        **model_overrides: GPT-2 config fields (e.g. ``resid_pdrop=0.0``).
    """
    stream = toy_stream(num_experiences, warmup_experiences)
    benchmark = stream.build()
    shape = {**TOY_MODEL_SHAPE, **model_overrides}
    model = tiny_gpt2(vocab_size=stream.vocab_size, **shape)
    return benchmark, ContinualLMModule(model, meta_kv=meta_kv, lr=lr)


TOY_LOOKUP_LABELS = ("red", "green", "blue")


def toy_lookup_setup(
    num_experiences: int = 2, *, items: int = 12, prompt_words: int = 4, warmup_texts: int = 0, seed: int = 0,
    lr: float = 3e-3,
) -> tuple[LMBenchmark, ContinualLMModule]:
    """(benchmark, module): a classification stream whose labels only near-duplicate training items tell.

    Each training item is ``prompt_words`` distinct random words from a vocabulary of 40, the template ``"{text} ="``
    and a label drawn at random from :data:`TOY_LOOKUP_LABELS`; each test item is one training item with
    its first word replaced, and the same label. A model that has not seen the training item can only
    guess (about 1 in 3). The warm-up stream (``warmup_texts`` > 0) teaches reading an example: texts
    ``"<near duplicate> = <label> <eos> <prompt> = <label>"`` on other random words and labels, the way
    a retrieved example precedes a prompt.

    Args:
        num_experiences: experiences of the stream.
        items: training (and test) items per experience.
        prompt_words: words per item (one of them differs in its test twin).
        warmup_texts: texts of the warm-up stream (0: none).
        seed: draws the words and labels.
        lr: learning rate.
    """
    import random

    rng = random.Random(seed)
    words = [f"w{index}" for index in range(40)]

    def pair() -> tuple[str, str]:
        prompt = rng.sample(words, prompt_words)
        near = [rng.choice([word for word in words if word not in prompt]), *prompt[1:]]
        return " ".join(prompt), " ".join(near)

    tasks = []
    for experience in range(num_experiences):
        pairs, labels = [pair() for _ in range(items)], [rng.choice(TOY_LOOKUP_LABELS) for _ in range(items)]
        tasks.append(ClassificationTask(
            f"lookup{experience}", train=[(prompt, label) for (prompt, _), label in zip(pairs, labels)],
            test=[(near, label) for (_, near), label in zip(pairs, labels)], labels=TOY_LOOKUP_LABELS,
            template="{text} =",
        ))
    copies = []
    for _ in range(warmup_texts):
        (prompt, near), label = pair(), rng.choice(TOY_LOOKUP_LABELS)
        copies.append(f"{prompt} = {label} <eos> {near} = {label}")
    warmup = [TextTask("copy", train=copies, test=copies[:1])] if warmup_texts else []
    tokenizer = word_level_tokenizer([" ".join(words + ["="] + list(TOY_LOOKUP_LABELS))])
    benchmark = make_benchmark(tasks, tokenizer, max_length=TOY_MODEL_SHAPE["n_positions"], warmup_tasks=warmup)
    model = tiny_gpt2(vocab_size=len(tokenizer), **TOY_MODEL_SHAPE)
    return benchmark, ContinualLMModule(model, lr=lr)


def toy_trainer_kwargs(root_dir: str | Path, max_epochs: int = 1, **extra: Any) -> dict[str, Any]:
    """Quiet single-CPU Trainer arguments writing under ``root_dir``."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "default_root_dir": str(root_dir),
        **extra,
    }


def toy_config(root_dir: str | Path, strategy: dict[str, Any] | None = None, **trainer: Any) -> dict[str, Any]:
    """A complete ``metakv-cl fit`` config (as a dict) for the toy stream.

    Args:
        root_dir: ``trainer.default_root_dir``.
        strategy: the ``strategy`` entry (default: naive fine-tuning).
        **trainer: extra Trainer arguments.
    """
    return {
        "seed_everything": 0,
        "trainer": toy_trainer_kwargs(root_dir, **trainer),
        "model": {
            "class_path": "metakv_cl.training.ContinualLMModule",
            "init_args": {"model": "gpt2", "from_scratch": True, "config_overrides": dict(TOY_MODEL_SHAPE), "lr": 3e-3},
        },
        "data": {
            "class_path": "metakv_cl.data.TaskStream",
            "init_args": {
                "tasks": toy_task_specs(2),
                "tokenizer": "word-level",
                "max_length": TOY_MODEL_SHAPE["n_positions"],
            },
        },
        "strategy": strategy or {"class_path": "metakv_cl.strategies.Naive", "init_args": {"train_mb_size": 8}},
    }


def write_config(folder: str | Path, config: dict[str, Any], name: str = "config.yaml") -> str:
    """Write ``config`` as YAML into ``folder``; return the file's path (for ``--config``)."""
    import yaml

    path = Path(folder) / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: toy models are faster so, and much faster on a
    machine whose cores are busy with other work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
