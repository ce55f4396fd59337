"""Padded vs packed training batches (``train_pack_length``), side by side in one run.

The same documents, the same model and the same mini-batches of documents train once with padded
batches and once with the documents of each mini-batch packed into fixed-length rows, through the
engine (:class:`~metakv_cl.strategies.Naive`, one ``Trainer.fit`` per run). Reported per mode:
training tokens/s (document tokens, from the strategy's own throughput clock; the median over
``--rounds`` interleaved rounds), the share of token slots that hold padding, and the per-step
training losses' largest difference between the two modes (packing is exact, so it is rounding).

Documents: synthetic topic sentences joined into paragraphs of 1 to 10 sentences (8 to 178
GPT-2 tokens, mean 78, with the defaults), tokenised with GPT-2's BPE on a compact vocabulary.

    python benchmarks/packing.py --out benchmarks/results/packing_cpu.json

Result on a shared 2-core CPU, one thread (benchmarks/results/packing_cpu.json): padded 3,769
tokens/s with 49.0% padding, packed 5,860 tokens/s with 11.2% padding (1.56x), largest per-step
loss difference 9.5e-7.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

import metakv_cl  # noqa: F401  (torchvision import fix before lightning loads)
import pytorch_lightning as pl
from metakv_cl.data.stream import CompactVocabulary, make_benchmark
from metakv_cl.data.synthetic import synthetic_topic_tasks
from metakv_cl.data.tasks import TextTask
from metakv_cl.hub import load_tokenizer
from metakv_cl.strategies import Naive
from metakv_cl.testing import tiny_gpt2
from metakv_cl.training.datamodule import TrainingDataModule
from metakv_cl.training.module import ContinualLMModule


def paragraphs(count: int, seed: int) -> list[str]:
    """``count`` paragraphs of 1 to 10 consecutive synthetic-topic sentences."""
    sentences = [s for task in synthetic_topic_tasks(num_experiences=3, entities_per_topic=16, seed=seed) for s in task.train]
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        size = rng.randint(1, 10)
        start = rng.randrange(len(sentences) - size)
        texts.append(" ".join(sentences[start : start + size]))
    return texts


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_once(experience, vocab_size: int, pack_length: int | None, args, root: Path) -> tuple[float, list[float]]:
    """(document tokens/s, per-step losses) of one epoch through the engine."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = tiny_gpt2(vocab_size=vocab_size, n_layer=args.layers, n_embd=args.hidden, n_head=4, n_positions=args.max_length,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    recorder = LossRecorder()
    strategy = Naive(
        module=ContinualLMModule(model, lr=1e-3),
        train_mb_size=args.batch_size,
        train_pack_length=pack_length,
        seed=args.seed,
        trainer_kwargs=dict(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, logger=False,
                            callbacks=[recorder], default_root_dir=str(root)),
    )
    strategy.train(experience)
    return strategy.throughput.tokens_per_second, recorder.losses


def padding_share(dataset, batch_size: int, seed: int, pack_length: int | None) -> tuple[float, int]:
    """(share of padded token slots, batches) over one epoch of training batches."""
    loader = TrainingDataModule(dataset, batch_size=batch_size, seed=seed, pack_length=pack_length).train_dataloader()
    slots = real = batches = 0
    for batch in loader:
        slots += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
        batches += 1
    return 1.0 - real / slots, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16, help="documents per mini-batch")
    parser.add_argument("--max-length", type=int, default=256, help="item limit and packed row length")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    texts = paragraphs(args.documents, args.seed)
    vocabulary = CompactVocabulary(load_tokenizer("gpt2"), texts)
    task = TextTask("paragraphs", train=texts, test=texts[:8])
    experience = make_benchmark([task], vocabulary, max_length=args.max_length, overflow="truncate").train_stream[0]
    dataset = experience.dataset
    lengths = [int(dataset[i]["input_ids"].shape[0]) for i in range(len(dataset))]
    modes = {"padded": None, "packed": args.max_length}
    speeds: dict[str, list[float]] = {mode: [] for mode in modes}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.rounds):
            for mode, pack_length in modes.items():
                speed, losses[mode] = train_once(experience, len(vocabulary), pack_length, args, Path(root) / mode)
                speeds[mode].append(speed)
    result = {
        "device": "cpu",
        "threads": args.threads,
        "model": f"GPT-2 shape, {args.layers} layers, hidden {args.hidden}, vocabulary {len(vocabulary)}",
        "documents": len(lengths),
        "document_tokens": {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)},
        "batch_size": args.batch_size,
        "pack_length": args.max_length,
        "rounds": args.rounds,
        "modes": {},
        "max_step_loss_difference": max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"])),
    }
    for mode, pack_length in modes.items():
        share, batches = padding_share(dataset, args.batch_size, args.seed, pack_length)
        result["modes"][mode] = {
            "tokens_per_s": statistics.median(speeds[mode]),
            "tokens_per_s_rounds": speeds[mode],
            "padding_share": share,
            "steps": batches,
        }
    result["speedup"] = result["modes"]["packed"]["tokens_per_s"] / result["modes"]["padded"]["tokens_per_s"]
    for mode, row in result["modes"].items():
        print(f"{mode:7s} {row['tokens_per_s']:10.0f} tokens/s  padding {100 * row['padding_share']:5.1f}%  steps {row['steps']}")
    print(f"packed / padded: {result['speedup']:.2f}x; largest per-step loss difference {result['max_step_loss_difference']:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
