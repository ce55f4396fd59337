"""Packed training batches: layout, exactness against padded batches, refusals, the engine option."""

import pytest
import pytorch_lightning as pl
import torch

from metakv_cl.lightning_cli import build_strategy
from metakv_cl.data.collate import IGNORE_INDEX, PadCollator
from metakv_cl.data.scoring import sequence_nll
from metakv_cl.data.stream import make_benchmark, word_level_tokenizer
from metakv_cl.data.tasks import ClassificationTask
from metakv_cl.modeling import MetaKVConfig, add_meta_kv
from metakv_cl.strategies import LwF, MetaKVConsolidation, Naive
from metakv_cl.testing import VOCAB, randomize_meta_kv, tiny_gpt2, tiny_llama
from metakv_cl.training.datamodule import TrainingDataModule
from metakv_cl.training.module import ContinualLMModule
from metakv_cl.training.packing import assign_rows, pack_items
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs

LENGTHS = (9, 3, 14, 6, 11, 2, 7)  # 52 tokens: 3 rows of 20, not 7 rows of 14 padded


def documents(lengths=LENGTHS, seed=0, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    items = []
    for length in lengths:
        ids = torch.randint(1, vocab, (length,), generator=generator)
        items.append({"input_ids": ids, "labels": ids.clone(), "experience": torch.tensor(0)})
    return items


def test_pack_items_lays_out_documents_with_restarting_positions():
    items = documents((3, 5, 2))
    batch, spans = pack_items(items, pack_length=6, pad_token_id=0)
    # first fit decreasing: 5 -> row 0, 3 -> row 1, 2 -> row 1 (3 + 2 <= 6)
    assert spans == [(1, 0, 3), (0, 0, 5), (1, 3, 2)]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
    assert batch["input_ids"][1, :3].tolist() == items[0]["input_ids"].tolist()
    assert batch["input_ids"][1, 3:5].tolist() == items[2]["input_ids"].tolist()
    assert batch["input_ids"][:, 5].tolist() == [0, 0]
    labels = batch["labels"]
    # no document predicts across its start; padding is never scored
    assert labels[0].tolist() == [IGNORE_INDEX, *items[1]["input_ids"][1:].tolist(), IGNORE_INDEX]
    assert labels[1].tolist() == [
        IGNORE_INDEX, *items[0]["input_ids"][1:].tolist(), IGNORE_INDEX, *items[2]["input_ids"][1:].tolist(), IGNORE_INDEX
    ]
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}


def test_assign_rows_refuses_a_document_longer_than_a_row():
    assert assign_rows([4, 4, 4], 8) == [[0, 1], [2]]
    with pytest.raises(ValueError, match=r"train_pack_length=8 is shorter than a training item of 9 tokens"):
        assign_rows([3, 9], 8)


def document_losses(logits, labels, spans):
    """Each document's summed NLL and scored-token count, read from its own span of the rows."""
    return [sequence_nll(logits[r : r + 1, s : s + n], labels[r : r + 1, s : s + n]) for r, s, n in spans]


def padded_and_packed(model, items, pack_length=20):
    """(per-document NLL, token-mean loss, gradients) of the padded and of the packed batch."""
    results = []
    padded = PadCollator(0)(items)
    packed, spans = pack_items(items, pack_length)
    for batch, forward in (
        (padded, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])),
        (packed, lambda b: model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)),
    ):
        model.zero_grad()
        logits = forward(batch).logits
        if batch is padded:
            nll, count = sequence_nll(logits, batch["labels"])
        else:
            per_doc = document_losses(logits, batch["labels"], spans)
            nll, count = torch.cat([n for n, _ in per_doc]), torch.cat([c for _, c in per_doc])
            row_nll, row_count = sequence_nll(logits, batch["labels"])  # what lm_loss sums
            assert float(row_nll.sum().detach()) == pytest.approx(float(nll.sum().detach()), rel=1e-5)
            assert int(row_count.sum()) == int(count.sum())
        loss = nll.sum() / count.sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((nll.detach(), count, loss.detach(), grads))
    return results


def assert_same(unpacked, packed):
    (nll_a, count_a, loss_a, grads_a), (nll_b, count_b, loss_b, grads_b) = unpacked, packed
    assert count_a.tolist() == count_b.tolist() == [n - 1 for n in LENGTHS]
    torch.testing.assert_close(nll_b, nll_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_gives_the_losses_and_gradients_of_the_padded_documents(build, attention):
    torch.manual_seed(0)
    model = build(attention)
    assert_same(*padded_and_packed(model, documents()))


def test_rows_without_document_boundaries_would_leak():
    """The control: the same rows read as one sequence each change every later document's loss."""
    torch.manual_seed(0)
    model = tiny_llama()
    items = documents()
    packed, spans = pack_items(items, 20)
    with torch.no_grad():
        ids, positions = packed["input_ids"], packed["position_ids"]
        separate = document_losses(model(input_ids=ids, position_ids=positions, use_cache=False).logits, packed["labels"], spans)
        # a 2-D mask (or a KV cache) turns transformers' detection of packed documents off
        joined = document_losses(
            model(input_ids=ids, attention_mask=packed["attention_mask"], position_ids=positions, use_cache=False).logits,
            packed["labels"],
            spans,
        )
    moved = [abs(float(a[0] - b[0])) > 1e-3 for a, b, (_, start, _) in zip(separate, joined, spans) if start > 0]
    assert moved and all(moved)


@pytest.mark.parametrize("source", ["consolidated", "mean", "max", "attentive", "recurrent", "hybrid", "addressed"])
def test_meta_kv_packs_exactly(source):
    """A consolidated meta-state is constant; a dynamic one restarts at every packed document."""
    torch.manual_seed(0)
    model = add_meta_kv(tiny_llama(), MetaKVConfig(source=source, rank=4))
    randomize_meta_kv(model)
    assert_same(*padded_and_packed(model, documents()))


def test_one_row_of_packed_positions_stands_for_every_row():
    torch.manual_seed(0)
    model = add_meta_kv(tiny_gpt2(), MetaKVConfig(source="mean", rank=4))
    randomize_meta_kv(model)
    ids = torch.randint(1, VOCAB, (3, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        shared = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        expanded = model(input_ids=ids, position_ids=positions.expand(3, -1), use_cache=False).logits
        second = model(input_ids=ids[:, 4:7], use_cache=False).logits  # the second document alone
    torch.testing.assert_close(shared, expanded)
    torch.testing.assert_close(shared[:, 4:7], second, rtol=1e-5, atol=1e-5)


class StepRecorder(pl.Callback):
    """Every training batch and its loss."""

    def __init__(self):
        self.batches, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch)
        self.losses.append(float(outputs["loss"]))


def toy_strategy(pack_length, meta_kv=None, strategy_cls=Naive, experiences=1):
    torch.manual_seed(0)
    benchmark, module = toy_setup(experiences, meta_kv=meta_kv, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if meta_kv is not None:
        randomize_meta_kv(module.model)
    recorder = StepRecorder()
    kwargs = toy_trainer_kwargs(".", enable_checkpointing=False, callbacks=[recorder])
    strategy = strategy_cls(module=module, train_mb_size=8, train_pack_length=pack_length, trainer_kwargs=kwargs)
    return strategy, benchmark, recorder


@pytest.mark.parametrize("source", ["consolidated", "hybrid"])
def test_training_step_on_a_packed_batch_gives_the_loss_and_gradients_of_the_padded_one(source):
    _, module = toy_setup(1, meta_kv=MetaKVConfig(source=source, rank=4), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    randomize_meta_kv(module.model)
    items = documents(vocab=module.vocab_size)
    results = []
    for batch in (PadCollator(0)(items), pack_items(items, 20)[0]):
        module.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert any(name.startswith("model.meta_kv") for name in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "strategy_cls, meta_kv, experiences",
    [(Naive, None, 1), (Naive, MetaKVConfig(source="hybrid", rank=4), 1), (LwF, None, 2)],
    ids=["naive", "naive-hybrid-meta-kv", "lwf"],  # LwF's teacher runs from the second experience
)
def test_engine_fit_with_packing_takes_the_same_steps(tmp_path, monkeypatch, strategy_cls, meta_kv, experiences):
    monkeypatch.chdir(tmp_path)
    runs = []
    for pack_length in (None, 26):  # the longest item of two toy experiences has 26 tokens
        strategy, benchmark, recorder = toy_strategy(pack_length, meta_kv, strategy_cls, experiences)
        for experience in benchmark.train_stream:
            strategy.train(experience)
        runs.append(recorder)
    padded, packed = runs
    assert len(padded.batches) == len(packed.batches) == 6 * experiences  # 42 items in mini-batches of 8
    assert all("position_ids" not in b for b in padded.batches)
    assert all("position_ids" in b and b["input_ids"].shape[1] == 26 for b in packed.batches)
    # the same documents per step: the same scored tokens, fewer token slots
    scored = [[int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in run.batches] for run in runs]
    assert scored[0] == scored[1]
    assert sum(b["input_ids"].numel() for b in packed.batches) < sum(b["input_ids"].numel() for b in padded.batches)
    # every step's loss follows from the previous steps' updates: equal losses = the same trajectory
    assert len(set(padded.losses)) == len(padded.losses)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-5)


def test_a_row_shorter_than_the_longest_item_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    strategy, benchmark, _ = toy_strategy(4)
    with pytest.raises(ValueError, match=r"train_pack_length=4 is shorter than the longest training item \(\d+ tokens\)"):
        strategy.train(benchmark.train_stream[0])


def test_classification_items_keep_padded_batches():
    task = ClassificationTask("s", train=[("good film", "positive"), ("bad film", "negative")], test=[("good", "positive")],
                              labels=["positive", "negative"])
    tokenizer = word_level_tokenizer(["good bad film Answer : positive negative"])
    dataset = make_benchmark([task], tokenizer, max_length=32).train_stream[0].dataset
    datamodule = TrainingDataModule(dataset, batch_size=2, pack_length=32)
    assert datamodule.pack_length is None
    batch = next(iter(datamodule.train_dataloader()))
    assert "position_ids" not in batch and batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize("value", [1, 0, True, 2.5])
def test_pack_length_must_be_an_integer_of_at_least_two(value):
    _, module = toy_setup(1)
    with pytest.raises(ValueError, match=r"train_pack_length must be an integer >= 2"):
        Naive(module=module, train_pack_length=value)


def test_distilling_meta_kv_consolidation_refuses_packing():
    _, module = toy_setup(1, meta_kv=MetaKVConfig(source="consolidated", rank=4))
    with pytest.raises(ValueError, match=r"train_pack_length is not supported by MetaKVConsolidation with mode 'distill'"):
        MetaKVConsolidation(module=module, mode="distill", train_pack_length=64)
    assert MetaKVConsolidation(module=module, mode="replay", train_pack_length=64).train_pack_length == 64


def test_option_is_reachable_from_a_config():
    _, module = toy_setup(1)
    spec = {"class_path": "metakv_cl.strategies.Replay", "init_args": {"buffer_size": 8, "train_pack_length": 128}}
    strategy = build_strategy(spec, module=module, trainer_kwargs={}, seed=0)
    assert strategy.train_pack_length == 128
    with pytest.raises(ValueError, match="train_pack_length"):
        build_strategy({**spec, "init_args": {"train_pack_length": "long"}}, module=module, trainer_kwargs={}, seed=0)
