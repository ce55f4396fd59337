"""Toy streams and models for tests, examples and smoke runs of the engine (no download, seconds on a CPU).

A toy stream is the synthetic topic stream with two entities per topic (42 training and 16 test
sentences per experience) and a word-level tokenizer fitted on it, so a tiny GPT-2 needs fewer
than 200 embeddings.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from metakv_cl.data.stream import LMBenchmark, TaskStream
from metakv_cl.data.synthetic import synthetic_topic_tasks
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
