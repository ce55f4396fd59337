"""A run killed inside an experience resumes from its checkpoints and ends with the same report."""

import json
import re

import pytest
import pytorch_lightning as pl
import torch

from metakv_cl.modeling import MetaKVConfig
from metakv_cl.strategies import KNNLM, MetaKVAddressed, MetaKVConsolidation, OLoRA, Replay, RetrievedExamples, plugins
from metakv_cl.training.runner import StreamState, run_stream, warm_up
from metakv_cl.training.testing import toy_lookup_setup, toy_setup, toy_trainer_kwargs


class Killed(RuntimeError):
    pass


class KillAt(pl.Callback):
    """Raise at a given batch of a given epoch of one phase (a crash in the middle of a fit)."""

    def __init__(self, stage: str, phase: str, epoch: int, batch: int):
        self.where, self.epoch, self.batch = f"{stage}/{phase}", epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.default_root_dir.endswith(self.where) and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise Killed(f"killed in {self.where} at epoch {self.epoch}, batch {self.batch}")


class CountBatches(pl.Callback):
    def __init__(self):
        self.batches = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        where = "/".join(trainer.default_root_dir.split("/")[-2:])
        self.batches[where] = self.batches.get(where, 0) + 1


CASES = {
    # Meta-KV (distill): killed during the consolidation of the second experience (fast phase finished)
    "metakv": (MetaKVConsolidation, {"mode": "distill", "buffer_size": 8}, KillAt("exp_001", "consolidate", epoch=1, batch=2)),
    # Meta-KV into the addressed bank: killed while the second experience's slots train, the first's regularised
    "metakv-addressed": (MetaKVAddressed, {"slots_per_experience": 2, "old_slots": "regularised", "buffer_size": 8},
                         KillAt("exp_001", "consolidate", epoch=1, batch=1)),
    # O-LoRA: killed while training the second adapter (the first one is rebuilt from the stream state)
    "olora": (OLoRA, {}, KillAt("exp_001", "train", epoch=1, batch=1)),
    # kNN-LM: killed while training the second experience (the first one's datastore comes from the stream state)
    "knn-lm": (KNNLM, {}, KillAt("exp_001", "train", epoch=1, batch=1)),
    # retrieval-augmented classification (a classification stream): killed while training the second experience
    "retrieval-icl": (RetrievedExamples, {}, KillAt("exp_001", "train", epoch=1, batch=1)),
    # replay: killed in the second epoch of the first experience
    "replay": (Replay, {"buffer_size": 8}, KillAt("exp_000", "train", epoch=1, batch=1)),
    # the same with packed training batches (rows of 32 tokens: the longest toy item fits)
    "replay-packed": (Replay, {"buffer_size": 8, "train_pack_length": 32}, KillAt("exp_000", "train", epoch=1, batch=1)),
    # the same with length-bucketed batches (4 batches of at most 128 padded tokens per epoch)
    "replay-bucketed": (Replay, {"buffer_size": 8, "train_token_budget": 128}, KillAt("exp_000", "train", epoch=1, batch=1)),
}


def start(strategy_cls, root, callbacks, **kwargs):
    torch.manual_seed(0)
    meta_kv = {
        MetaKVConsolidation: MetaKVConfig(rank=4, state_dim=16),
        MetaKVAddressed: MetaKVConfig(source="addressed", memory_slots=4, rank=4, state_dim=16),
    }.get(strategy_cls)
    if strategy_cls is RetrievedExamples:
        benchmark, module = toy_lookup_setup(2, items=24, warmup_texts=16)
    else:
        benchmark, module = toy_setup(2, meta_kv=meta_kv, warmup_experiences=1)
    trainer_kwargs = toy_trainer_kwargs(root, max_epochs=2, callbacks=callbacks)
    warm_up(module, benchmark, root_dir=root, epochs=1, trainer_kwargs=toy_trainer_kwargs(root), train_mb_size=8)
    strategy = strategy_cls(module=module, trainer_kwargs=trainer_kwargs, train_mb_size=8, **kwargs)
    return strategy, benchmark


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_kill_gives_the_same_report(case, tmp_path):
    strategy_cls, kwargs, kill = CASES[case]
    strategy, benchmark = start(strategy_cls, tmp_path / "uninterrupted", [], **kwargs)
    expected = run_stream(strategy, benchmark)

    root = tmp_path / "killed"
    strategy, benchmark = start(strategy_cls, root, [kill], **kwargs)
    with pytest.raises(Killed):
        run_stream(strategy, benchmark)
    progress = json.loads((root / "stream_state" / "progress.json").read_text())
    killed_stage = int(kill.where.split("/")[0].split("_")[1])
    assert progress["next_experience"] == killed_stage
    assert (root / "experiences" / kill.where / "last.ckpt").is_file()

    counter = CountBatches()
    strategy, benchmark = start(strategy_cls, root, [counter], **kwargs)
    resumed = run_stream(strategy, benchmark, resume=True)

    flat = lambda matrix: [value for row in matrix for value in row]  # noqa: E731
    assert len(resumed.matrix) == len(expected.matrix)
    assert flat(resumed.matrix) == flat(expected.matrix)  # bitwise on the CPU, as the README promises
    assert resumed.items == expected.items  # the outcomes of the rows before the kill come from the state
    for figure in ("average", "forgetting", "bwt", "fwt"):
        assert resumed.summary[figure] == expected.summary[figure]
    # throughput counts every training token once: the finished epochs of the killed phase and
    # of its finished phases come from their checkpoints, the rerun epoch is counted again
    assert resumed.extra["train_tokens"] == expected.extra["train_tokens"] > 0
    assert resumed.extra["train_tokens_per_s"] == pytest.approx(
        resumed.extra["train_tokens"] / resumed.extra["train_seconds"]
    )
    # finished experiences were not trained again; the killed phase redid only its last epoch
    trained_stages = {where.split("/")[0] for where, count in counter.batches.items() if count}
    assert all(int(stage.split("_")[1]) >= killed_stage for stage in trained_stages)
    batches_per_epoch = -(-len(benchmark.train_stream[killed_stage].dataset) // 8)
    assert 0 < counter.batches[kill.where] <= batches_per_epoch + 1
    assert StreamState(root).exists()


def test_resume_restores_the_retrieval_datastore_bitwise(tmp_path):
    strategy_cls, kwargs, kill = CASES["retrieval-icl"]
    strategy, benchmark = start(strategy_cls, tmp_path / "uninterrupted", [], **kwargs)
    run_stream(strategy, benchmark)
    expected = strategy.plugin(plugins.RetrievedExamples).store.state_dict()
    root = tmp_path / "killed"
    strategy, benchmark = start(strategy_cls, root, [kill], **kwargs)
    with pytest.raises(Killed):
        run_stream(strategy, benchmark)
    strategy, benchmark = start(strategy_cls, root, [], **kwargs)
    restored = strategy.plugin(plugins.RetrievedExamples)
    StreamState(root).load(strategy, benchmark)  # the state after the first experience, as the resumed run reads it
    assert len(restored.store) == len(benchmark.train_stream[0].dataset)
    run_stream(strategy, benchmark, resume=True)
    resumed = strategy.plugin(plugins.RetrievedExamples).store.state_dict()
    assert all(torch.equal(resumed[key], expected[key]) for key in ("tokens", "lengths", "prompt_lengths"))
    assert torch.equal(resumed["datastore"]["index"], expected["datastore"]["index"])  # the keys, bitwise


def test_resume_refuses_a_different_stream(tmp_path):
    strategy, benchmark = start(Replay, tmp_path, [], buffer_size=8)
    run_stream(strategy, benchmark)
    torch.manual_seed(0)
    other, module = toy_setup(3)
    with pytest.raises(ValueError, match="different stream"):
        run_stream(Replay(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path)), other, resume=True)


@pytest.mark.parametrize("name", ["ewc", "lora", "olora", "lwf", "metakv", "joint"])
def test_a_finished_run_restores_weights_and_strategy_state(name, tmp_path):
    from metakv_cl.strategies import STRATEGIES

    cls = STRATEGIES[name]
    kwargs = {"lora": {"mode": "per_experience"}, "metakv": {"buffer_size": 8}}.get(name, {})
    strategy, benchmark = start(cls, tmp_path, [], **kwargs)
    finished = run_stream(strategy, benchmark)
    strategy, benchmark = start(cls, tmp_path, [], **kwargs)
    restored = run_stream(strategy, benchmark, resume=True)  # nothing left to train
    assert restored.matrix == finished.matrix
    strategy.eval(benchmark.test_stream)  # the restored model scores what the finished one did
    assert [strategy.eval_scores[j] for j in range(2)] == finished.matrix[-1]
    if name in ("lora", "olora"):
        assert strategy.plugin(plugins.LoRA).adapters == ["exp_0", "exp_1"]
    if name == "ewc":
        assert len(strategy.plugin(plugins.EWC).importances) == 2
    if name == "metakv":
        assert len(strategy.plugin(plugins.MetaKVConsolidation).memory_history) == 2
        assert len(strategy.plugin(plugins.Replay).memory) == 8


def kill_during_first_experience(root):
    strategy, benchmark = start(Replay, root, [KillAt("exp_000", "train", epoch=1, batch=1)], buffer_size=8)
    with pytest.raises(Killed):
        run_stream(strategy, benchmark)
    return root / "experiences" / "exp_000" / "train" / "last.ckpt"


def test_a_truncated_last_ckpt_restarts_its_phase_with_a_warning(tmp_path, caplog):
    strategy, benchmark = start(Replay, tmp_path / "uninterrupted", [], buffer_size=8)
    expected = run_stream(strategy, benchmark)
    last = kill_during_first_experience(tmp_path / "killed")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a full disk leaves

    counter = CountBatches()
    strategy, benchmark = start(Replay, tmp_path / "killed", [counter], buffer_size=8)
    resumed = run_stream(strategy, benchmark, resume=True)
    assert f"{last} is unreadable" in caplog.text and "restarting phase 'train'" in caplog.text
    batches_per_epoch = -(-len(benchmark.train_stream[0].dataset) // 8)
    assert counter.batches["exp_000/train"] == 2 * batches_per_epoch  # both epochs again
    assert resumed.matrix == expected.matrix
    assert resumed.extra["train_tokens"] == expected.extra["train_tokens"]


def test_a_planted_last_ckpt_is_refused_without_running(tmp_path, planted):
    from metakv_cl.runfolder import UnsafeCheckpointError

    payload, marker = planted
    last = kill_during_first_experience(tmp_path)
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["callbacks"] = payload
    torch.save(checkpoint, last)
    strategy, benchmark = start(Replay, tmp_path, [], buffer_size=8)
    with pytest.raises(UnsafeCheckpointError, match=f"{re.escape(str(last))} was refused"):
        run_stream(strategy, benchmark, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["state.pt", "state.safetensors"])
def test_a_planted_stream_state_is_refused_without_running(name, tmp_path, planted):
    from metakv_cl.runfolder import RunFolderError

    payload, marker = planted
    (tmp_path / "stream_state").mkdir()
    path = tmp_path / "stream_state" / name
    torch.save({"format": 1, "evil": payload}, path)
    strategy, benchmark = start(Replay, tmp_path, [], buffer_size=8)
    with pytest.raises(RunFolderError, match=f"{re.escape(str(path))} (is a pickle stream state|is not a readable state file)"):
        run_stream(strategy, benchmark, resume=True)
    assert not marker.exists()


def test_warm_up_weights_are_reused_only_with_the_same_settings(tmp_path):
    def warmed(epochs):
        torch.manual_seed(0)
        benchmark, module = toy_setup(1, warmup_experiences=1)
        warm_up(module, benchmark, root_dir=tmp_path, epochs=epochs, trainer_kwargs=toy_trainer_kwargs(tmp_path))
        return {name: tensor.clone() for name, tensor in module.state_dict().items()}

    one, two = warmed(1), warmed(2)
    assert len(list((tmp_path / "warmup").iterdir())) == 2  # one cache per setting
    assert any(not torch.equal(one[name], two[name]) for name in one)
    again = warmed(1)
    assert len(list((tmp_path / "warmup").iterdir())) == 2
    assert all(torch.equal(one[name], again[name]) for name in one)


def test_the_warm_up_key_covers_callback_settings():
    """A changed EarlyStopping patience must not silently reuse warm-up weights trained with another."""
    from pytorch_lightning.callbacks import EarlyStopping

    from metakv_cl.training.runner import _warm_up_key

    benchmark, module = toy_setup(1, warmup_experiences=1)

    def key(patience):
        trainer = {**toy_trainer_kwargs("/tmp/unused"), "callbacks": [EarlyStopping(monitor="loss", patience=patience)]}
        return _warm_up_key(module, benchmark, 1, trainer, 8, 0)

    assert key(1) == key(1) != key(2)
