"""Padding in the batches of downstream classification tasks, as the engine's loaders make them.

Training: shuffled mini-batches of ``--batch-size`` items vs token-budget batches
(``train_token_budget``, :mod:`metakv_cl.training.bucketing`), one epoch each. Evaluation: the
test set in its own order vs the length order of :class:`EvaluationDataModule`, in batches of
``--eval-batch-size``. Only token slots are counted (no model runs): the padding share of a set
of batches is 1 - real tokens / token slots, where a training batch holds ``items x longest``
slots and an evaluation batch ``items x candidates x longest``.

    python benchmarks/padding.py --order 1 --out benchmarks/results/padding_downstream_order1.json

Result (GPT-2 tokenizer, order 1, 1,000 training / 500 test items per task, prompts cut to 256
tokens; benchmarks/results/padding_downstream_order1.json), padded share of the token slots:

======================  ===============  ==================  ================  ===============
task                    train, 16 items  train, 2048 tokens  eval, test order  eval, by length
======================  ===============  ==================  ================  ===============
dbpedia                 36.9%            1.7%                41.1%             7.8%
amazon                  46.0%            1.4%                50.1%             5.6%
qqp (yahoo substitute)  36.9%            2.4%                37.6%             4.2%
agnews                  36.5%            2.0%                47.0%             10.1%
======================  ===============  ==================  ================  ===============

0 to 2 points of the evaluation shares lie inside the items (the candidate rows of an item
differ by the lengths of their label strings), whatever the batching.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.utils.data import DataLoader

import metakv_cl  # noqa: F401  (torchvision import fix before lightning loads)
from metakv_cl.data.downstream import downstream_tasks
from metakv_cl.data.stream import make_benchmark
from metakv_cl.hub import load_tokenizer
from metakv_cl.training.datamodule import EvaluationDataModule, TrainingDataModule


def padding_share(batches, tokens: str, mask: str) -> tuple[float, int]:
    """(share of the token slots that hold padding, number of batches) of ``batches``.

    Args:
        batches: collated batches.
        tokens: the key of their token ids.
        mask: the key of their attention mask (1 on real tokens).
    """
    slots = real = count = 0
    for batch in batches:
        slots += batch[tokens].numel()
        real += int(batch[mask].sum())
        count += 1
    return 1 - real / slots, count


def measure(train, test, batch_size: int, eval_batch_size: int, token_budget: int, seed: int = 0) -> dict[str, float]:
    """Padding shares and batch counts of one experience's training and test items.

    Args:
        train: the training items (an experience dataset).
        test: the test items.
        batch_size: training items per shuffled mini-batch.
        eval_batch_size: test items per batch.
        token_budget: padded tokens per token-budget batch.
        seed: shuffling seed.

    Returns:
        ``{"train_shuffled", "train_bucketed", "eval_test_order", "eval_by_length"}`` padding shares
        and their ``*_batches`` counts.
    """
    loaders = {
        "train_shuffled": TrainingDataModule(train, batch_size=batch_size, seed=seed).train_dataloader(),
        "train_bucketed": TrainingDataModule(train, batch_size=batch_size, seed=seed, token_budget=token_budget)
        .train_dataloader(),
        "eval_test_order": DataLoader(test, batch_size=eval_batch_size, collate_fn=test.collate_fn),
        "eval_by_length": EvaluationDataModule(test, batch_size=eval_batch_size).val_dataloader(),
    }
    result = {}
    for name, loader in loaders.items():
        tokens = "input_ids" if name.startswith("train") else "choice_input_ids"
        mask = "attention_mask" if name.startswith("train") else "choice_attention_mask"
        result[name], result[f"{name}_batches"] = padding_share(loader, tokens, mask)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--order", default="1", help="downstream order (1, 2, 3, long_mixed)")
    parser.add_argument("--root", default=None, help="data root (default: ../shared/data)")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per item; longer prompts are cut")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    tasks = downstream_tasks(
        args.order, root=args.root, max_train=args.max_train, max_test=args.max_test, seed=args.seed
    )
    benchmark = make_benchmark(tasks, load_tokenizer("gpt2"), max_length=args.max_length, overflow="truncate")
    rows = {}
    for task, train, test in zip(tasks, benchmark.train_stream, benchmark.test_stream):
        rows[task.name] = measure(train.dataset, test.dataset, args.batch_size, args.eval_batch_size,
                                  args.token_budget, args.seed)
    print(f"padded share of token slots (batches), GPT-2 tokenizer; training: {args.batch_size} shuffled items vs "
          f"{args.token_budget}-token budget; evaluation: batches of {args.eval_batch_size}")
    print("| task | train shuffled | train bucketed | eval test order | eval by length |\n|---|---|---|---|---|")
    for name, row in rows.items():
        cells = [f"{row[key]:.1%} ({row[f'{key}_batches']})"
                 for key in ("train_shuffled", "train_bucketed", "eval_test_order", "eval_by_length")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "tasks": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
