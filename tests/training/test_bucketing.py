"""Length-bucketed training batches under a token budget, and length-ordered evaluation batches."""

import random
from collections import defaultdict

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from metakv_cl.data.scoring import sequence_nll
from metakv_cl.data.stream import make_benchmark, word_level_tokenizer
from metakv_cl.data.tasks import ClassificationTask
from metakv_cl.lightning_cli import build_strategy
from metakv_cl.strategies import Naive
from metakv_cl.testing import tiny_gpt2
from metakv_cl.training.bucketing import TokenBudgetBatchSampler, plan_batch_sizes
from metakv_cl.training.callbacks import derived_seed
from metakv_cl.training.datamodule import EvaluationDataModule, TrainingDataModule
from metakv_cl.training.module import ContinualLMModule
from metakv_cl.training.packing import model_inputs
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs

WORDS = "red green blue cyan gold gray pink teal plum navy".split()
BUDGET = 96


def varied_lengths(count=103, seed=0):
    rng = random.Random(seed)
    return [rng.randint(2, 40) for _ in range(count - 2)] + [BUDGET + 5, BUDGET + 30]  # two over the budget


def padded_size(batch, lengths):
    return len(batch) * max(lengths[i] for i in batch)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_item_once_within_the_budget_and_ranks_disjoint_with_equal_steps(world):
    lengths = varied_lengths()
    shares = [list(TokenBudgetBatchSampler(lengths, BUDGET, num_replicas=world, rank=r, seed=1)) for r in range(world)]
    assert len({len(share) for share in shares}) == 1  # the same number of steps on every rank
    assert all(len(share) == len(TokenBudgetBatchSampler(lengths, BUDGET, num_replicas=world)) for share in shares)
    items = [i for share in shares for batch in share for i in batch]
    assert sorted(items) == list(range(len(lengths)))  # every item exactly once, ranks disjoint
    for batch in (batch for share in shares for batch in share):
        assert padded_size(batch, lengths) <= BUDGET or len(batch) == 1
    alone = [batch for share in shares for batch in share if max(lengths[i] for i in batch) > BUDGET]
    assert sorted(alone) == [[101], [102]]


def test_batches_depend_only_on_seed_and_epoch_and_change_between_epochs():
    lengths = varied_lengths()
    trained = TokenBudgetBatchSampler(lengths, BUDGET, seed=7)
    epochs = []
    for epoch in range(3):
        trained.set_epoch(epoch)
        epochs.append(list(trained))
    resumed = TokenBudgetBatchSampler(lengths, BUDGET, seed=7)  # a fresh process resuming at epoch 2
    made_before_the_epoch_was_set = iter(resumed)  # as Lightning does on resuming
    resumed.set_epoch(2)
    assert list(made_before_the_epoch_was_set) == list(resumed) == epochs[2]
    assert epochs[0] != epochs[1] != epochs[2]
    assert list(TokenBudgetBatchSampler(lengths, BUDGET, seed=8)) != epochs[0]
    # items of one length land in new batches every epoch, not only the batch order changes
    assert {tuple(b) for b in epochs[0]} != {tuple(b) for b in epochs[1]}
    longest = [max(lengths[i] for i in batch) for batch in epochs[0]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # no length ramp over the epoch


def test_batches_split_to_share_evenly_and_refuse_what_cannot():
    assert plan_batch_sizes([3] * 5, token_budget=100) == [5]
    assert plan_batch_sizes([3] * 5, token_budget=100, num_replicas=2) == [2, 3]
    assert plan_batch_sizes([3] * 5, token_budget=100, num_replicas=4) == [1, 1, 1, 2]
    assert plan_batch_sizes([2, 2, 3, 5, 9], token_budget=10) == [3, 1, 1]  # 3 x 3 <= 10; 2 x 5 > 10
    with pytest.raises(ValueError, match=r"train_token_budget=5 gives each of the 3 training items a batch of its own"):
        plan_batch_sizes([9, 9, 9], token_budget=5, num_replicas=2)


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "64"])
def test_token_budget_must_be_a_positive_integer(value):
    _, module = toy_setup(1)
    with pytest.raises(ValueError, match=r"train_token_budget must be an integer >= 1 \(padded tokens per training"):
        Naive(module=module, train_token_budget=value)


def test_option_is_reachable_from_a_config():
    _, module = toy_setup(1)
    spec = {"class_path": "metakv_cl.strategies.Replay", "init_args": {"buffer_size": 8, "train_token_budget": 512}}
    assert build_strategy(spec, module=module, trainer_kwargs={}, seed=0).train_token_budget == 512
    with pytest.raises(ValueError, match="train_token_budget"):
        build_strategy({**spec, "init_args": {"train_token_budget": "many"}}, module=module, trainer_kwargs={}, seed=0)


# ---------------------------------------------------------------- classification data


def classification_benchmark(train_count=40, test_count=24, seed=0):
    rng = random.Random(seed)

    def pairs(count):
        return [(" ".join(rng.choices(WORDS, k=rng.randint(1, 24))), rng.choice(["yes", "no"])) for _ in range(count)]

    task = ClassificationTask("colours", train=pairs(train_count), test=pairs(test_count), labels=["yes", "no"])
    tokenizer = word_level_tokenizer([" ".join(WORDS) + " yes no Answer :"])
    return make_benchmark([task], tokenizer, max_length=64), len(tokenizer)


def padding_share(batches, key="input_ids", mask="attention_mask"):
    slots = sum(batch[key].numel() for batch in batches)
    return 1 - sum(int(batch[mask].sum()) for batch in batches) / slots


def test_bucketed_classification_batches_pad_less_than_shuffled_batches():
    dataset = classification_benchmark(train_count=120)[0].train_stream[0].dataset
    shuffled = list(TrainingDataModule(dataset, batch_size=8).train_dataloader())
    bucketed = list(TrainingDataModule(dataset, batch_size=8, token_budget=256).train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in bucketed) == sum(b["input_ids"].shape[0] for b in shuffled) == 120
    assert all(b["input_ids"].numel() <= 256 for b in bucketed)
    assert padding_share(bucketed) < 0.1 and padding_share(shuffled) > 0.25


class EpochBatches(pl.Callback):
    def __init__(self):
        self.epochs = defaultdict(list)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs[trainer.current_epoch].append({k: v.clone() for k, v in batch.items()})


def padded_nll(model, batch):
    """Each row's summed label NLL and label-token count in a padded batch."""
    with torch.no_grad():
        return sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])


def item_losses(model, batches):
    """Each item's (token ids, summed label NLL, label tokens), read from the batches it sits in."""
    losses = []
    for batch in batches:
        nll, count = padded_nll(model, batch)
        for row in range(batch["input_ids"].shape[0]):
            ids = tuple(batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist())
            losses.append((ids, float(nll[row]), int(count[row])))
    return sorted(losses)


def test_fit_with_a_token_budget_trains_on_bucketed_batches_with_unchanged_item_losses(tmp_path):
    torch.manual_seed(0)
    benchmark, vocab_size = classification_benchmark()
    model = tiny_gpt2(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=4, n_positions=64,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module = ContinualLMModule(model, lr=3e-3)
    recorder = EpochBatches()
    kwargs = toy_trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=False, callbacks=[recorder])
    strategy = Naive(module=module, train_mb_size=4, train_token_budget=160, trainer_kwargs=kwargs)
    strategy.train(benchmark.train_stream[0])

    # the batches Lightning ran are the data module's batches of each epoch (it set the epoch)
    dataset = benchmark.train_stream[0].dataset
    seed = derived_seed(strategy.seed, strategy.stage_for(0), "train")
    data = TrainingDataModule(dataset, batch_size=4, seed=seed, token_budget=160)
    for epoch in (0, 1):
        loader = data.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        expected = list(loader)
        assert len(recorder.epochs[epoch]) == len(expected) < 40 / 4
        for ran, planned in zip(recorder.epochs[epoch], expected):
            assert torch.equal(ran["input_ids"], planned["input_ids"])
            assert ran["input_ids"].numel() <= 160
    assert [b["input_ids"].shape for b in recorder.epochs[0]] != [b["input_ids"].shape for b in recorder.epochs[1]]

    # each item's loss is the same in its bucketed batch and in a shuffled batch of train_mb_size items
    module.eval()
    bucketed = item_losses(module.model, recorder.epochs[1])
    shuffled = item_losses(module.model, TrainingDataModule(dataset, batch_size=4).train_dataloader())
    assert [(ids, count) for ids, _, count in bucketed] == [(ids, count) for ids, _, count in shuffled]
    assert [nll for _, nll, _ in bucketed] == pytest.approx([nll for _, nll, _ in shuffled], rel=1e-5, abs=1e-6)
    # the training loss of a bucketed batch is the token mean over its items' label tokens
    batch = recorder.epochs[1][0]
    nll, count = padded_nll(module.model, batch)
    with torch.no_grad():
        loss = module.lm_loss(batch, module.batch_forward(**model_inputs(batch)))[0]
    assert float(loss) == pytest.approx(float(nll.sum() / count.sum()), rel=1e-6)


# ---------------------------------------------------------------- evaluation


def test_evaluation_batches_are_length_ordered_and_carry_each_item_s_test_set_index():
    dataset = classification_benchmark(test_count=48)[0].test_stream[0].dataset
    batches = list(EvaluationDataModule(dataset, batch_size=8).val_dataloader())
    widths = [b["choice_input_ids"].shape[-1] for b in batches]
    assert widths == sorted(widths, reverse=True)
    indices = torch.cat([b["index"] for b in batches])
    assert indices.dtype == torch.int64 and sorted(indices.tolist()) == list(range(48))
    for batch in batches:
        for row, index in enumerate(batch["index"].tolist()):
            item = dataset[index]
            width = item["choice_input_ids"].shape[-1]
            assert torch.equal(batch["choice_input_ids"][row, :, :width], item["choice_input_ids"])
            assert int(batch["target"][row]) == int(item["target"])
    in_test_set_order = list(DataLoader(dataset, batch_size=8, collate_fn=dataset.collate_fn))
    args = ("choice_input_ids", "choice_attention_mask")
    assert padding_share(batches, *args) < padding_share(in_test_set_order, *args) / 2


def test_length_ordered_evaluation_reports_what_test_set_order_reports(tmp_path):
    torch.manual_seed(0)
    benchmark, vocab_size = classification_benchmark(test_count=48)
    module = ContinualLMModule(tiny_gpt2(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=4, n_positions=64))
    dataset = benchmark.test_stream[0].dataset
    trainer = pl.Trainer(**toy_trainer_kwargs(tmp_path, enable_checkpointing=False))
    trainer.validate(module, datamodule=EvaluationDataModule(dataset, batch_size=8), verbose=False)
    ordered, ordered_items = dict(module.eval_result), dict(module.eval_items)
    items = [{**dataset[i], "index": torch.tensor(i)} for i in range(len(dataset))]
    in_test_set_order = DataLoader(items, batch_size=8, collate_fn=dataset.collate_fn)
    trainer.validate(module, dataloaders=in_test_set_order, verbose=False)
    in_order = dict(module.eval_result)
    assert ordered["examples"] == in_order["examples"] == 48
    assert ordered["accuracy"] == in_order["accuracy"]
    assert ordered["loss"] == pytest.approx(in_order["loss"], rel=1e-6)
    # per-item outcomes come back in test-set order whatever order the loader served
    assert ordered_items == module.eval_items and ordered_items["gold"] == [int(dataset[i]["target"]) for i in range(48)]
