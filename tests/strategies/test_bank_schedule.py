"""Consolidation into the addressed bank (issue 17 item 2): slots per experience, old slots
protected, the bank's history kept for resume, and the routing recorded per test experience."""

import json
from pathlib import Path

import pytest
import torch

from metakv_cl.modeling import MetaKVConfig, get_meta_kv
from metakv_cl.strategies import MetaKVAddressed
from metakv_cl.strategies.plugins import BankSchedule, PluginConflictError
from metakv_cl.training.runner import run_stream
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs

ADDRESSED = MetaKVConfig(source="addressed", memory_slots=8, rank=4, state_dim=16)


def make(tmp_path, meta_kv=ADDRESSED, num_experiences=2, **kwargs):
    torch.manual_seed(0)
    benchmark, module = toy_setup(num_experiences, meta_kv=meta_kv)
    kwargs = {"slots_per_experience": 2, "buffer_size": 8, "consolidation_lr": 1e-2, **kwargs}
    strategy = MetaKVAddressed(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=8, **kwargs)
    return strategy, benchmark


def banks(strategy):
    return [layer.bank for layer in get_meta_kv(strategy.module.model).layers]


def bank_tensors(strategy):
    return [(bank.keys.detach().clone(), bank.values.detach().clone()) for bank in banks(strategy)]


def test_each_experience_opens_its_slots_and_frozen_old_slots_stay_bitwise(tmp_path):
    strategy, benchmark = make(tmp_path, old_slots="frozen")
    schedule = strategy.plugin(BankSchedule)
    assert strategy.method_name == "metakv-replay+slots2-frozen"
    for k, experience in enumerate(benchmark.train_stream, 1):
        before = bank_tensors(strategy)
        strategy.train(experience)
        after = bank_tensors(strategy)
        assert schedule.open_slot_count == 2 * k
        assert all(int(bank.open.sum()) == 2 * k and bool(bank.open[: 2 * k].all()) for bank in banks(strategy))
        old, new = slice(0, 2 * (k - 1)), slice(2 * (k - 1), 2 * k)
        for (keys0, values0), (keys1, values1) in zip(before, after):
            assert torch.equal(keys1[old], keys0[old]) and torch.equal(values1[old], values0[old])
            assert not torch.equal(values1[new], values0[new]) and not torch.equal(keys1[new], keys0[new])
            assert torch.equal(keys1[2 * k:], keys0[2 * k:])  # closed slots are not read, so not trained
    assert schedule.experience_slots == [[0, 1], [2, 3]]
    for snapshot, slots in zip(schedule.slot_snapshots, schedule.experience_slots):
        assert snapshot["keys"].shape == (2, 2, 16)
        assert torch.equal(snapshot["values"][0], banks(strategy)[0].values.detach()[slots])  # frozen since


def old_slot_drift(tmp_path, **kwargs):
    """How far experience 1 moved the slots experience 0 left, over every layer's keys and values."""
    strategy, benchmark = make(tmp_path, **kwargs)
    strategy.train(benchmark.train_stream[0])
    before = bank_tensors(strategy)
    strategy.train(benchmark.train_stream[1])
    return sum(float((k1[:2] - k0[:2]).square().sum() + (v1[:2] - v0[:2]).square().sum())
               for (k0, v0), (k1, v1) in zip(before, bank_tensors(strategy))) ** 0.5


def test_regularised_old_slots_move_less_than_trained_ones(tmp_path):
    trained = old_slot_drift(tmp_path / "trained", old_slots="trained")
    regularised = old_slot_drift(tmp_path / "regularised", old_slots="regularised", old_slots_weight=10.0)
    assert 0 < regularised < 0.5 * trained, (regularised, trained)


def test_a_full_bank_is_named_with_its_capacity(tmp_path):
    small = MetaKVConfig(source="addressed", memory_slots=3, rank=4, state_dim=16)
    strategy, benchmark = make(tmp_path, meta_kv=small)
    strategy.train(benchmark.train_stream[0])
    with pytest.raises(ValueError, match=r"slots_per_experience=2 needs slots 2\.\.3 but the bank holds "
                                         r"meta_kv\.memory_slots=3; raise memory_slots to at least 4"):
        strategy.train(benchmark.train_stream[1])
    with pytest.raises(ValueError, match=r"slots_per_experience=4 does not fit the bank's meta_kv\.memory_slots=3"):
        make(tmp_path, meta_kv=small, slots_per_experience=4)


def test_the_schedule_refuses_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match=r"BankSchedule needs a Meta-KV model with source 'addressed' .*'consolidated'"):
        make(tmp_path, meta_kv=MetaKVConfig(rank=4, state_dim=16))
    with pytest.raises(ValueError, match="unknown old_slots 'kept'; choose one of frozen, regularised, trained"):
        BankSchedule(old_slots="kept")
    with pytest.raises(ValueError, match="slots_per_experience must be an integer >= 1, got 0"):
        BankSchedule(slots_per_experience=0)
    with pytest.raises(PluginConflictError, match=r"plugins\[1\] MetaKVConsolidation and plugins\[2\] BankSchedule "
                                                   r"cannot be combined: consolidate_groups=\['generator'\] leaves"):
        make(tmp_path, consolidate_groups=["generator"])


def test_resume_restores_the_bank_history_bitwise(tmp_path):
    strategy, benchmark = make(tmp_path, old_slots="regularised")
    run_stream(strategy, benchmark)
    finished = strategy.plugin(BankSchedule)
    resumed, benchmark = make(tmp_path, old_slots="regularised")
    run_stream(resumed, benchmark, resume=True)  # nothing left to train: history and model come from the run folder
    restored = resumed.plugin(BankSchedule)
    assert restored.experience_slots == finished.experience_slots == [[0, 1], [2, 3]]
    for ours, theirs in zip(restored.slot_snapshots, finished.slot_snapshots, strict=True):
        assert torch.equal(ours["keys"], theirs["keys"]) and torch.equal(ours["values"], theirs["values"])
    assert all(int(bank.open.sum()) == 4 for bank in banks(resumed))


def test_the_routing_of_each_test_experience_is_recorded_and_plotted(tmp_path):
    from metakv_cl.report import write_report

    strategy, benchmark = make(tmp_path)
    result = run_stream(strategy, benchmark)
    routing = result.extra["slot_read_weights"]
    assert torch.tensor(routing).shape == (2, 8)  # test experiences x slots
    assert torch.allclose(torch.tensor(routing).sum(dim=1), torch.ones(2))
    assert all(row[4:] == [0.0] * 4 for row in routing)  # closed slots are never read
    assert torch.tensor(result.extra["slot_read_weights_per_layer"]).shape == (2, 2, 8)
    assert result.extra["slot_experience"] == [0, 0, 1, 1, None, None, None, None]
    assert result.extra["slot_read_experiences"] == [0, 1]
    paths = write_report([result], tmp_path / "report")
    assert paths[f"routing:{result.method}"].read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(paths["json"].read_text())["methods"][0]["extra"]
    assert saved["slot_read_weights"] == routing



def test_the_ablation_config_runs_every_arm_on_a_tiny_model(tmp_path, capsys):
    """configs/metakv_addressed_ablation.yaml with its stream and model shrunk to the toy ones."""
    import yaml

    from metakv_cl.cli import main
    from metakv_cl.training.testing import TOY_MODEL_SHAPE, toy_config, write_config

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "metakv_addressed_ablation.yaml").read_text())
    toy = toy_config(tmp_path / "ablation")
    config["trainer"], config["data"] = toy["trainer"], toy["data"]
    config["model"]["init_args"]["config_overrides"] = dict(TOY_MODEL_SHAPE)
    main(["compare", "--config", write_config(tmp_path, config)])
    methods = {m["method"]: m for m in json.loads((tmp_path / "ablation" / "report.json").read_text())["methods"]}
    assert list(methods) == [entry.get("init_args", {}).get("name", "naive") for entry in config["strategies"]]
    opened = {"addressed-s1": 2, "addressed-s16": 32}
    for name, method in methods.items():
        if name.startswith("addressed"):
            owners = method["extra"]["slot_experience"]
            assert sum(owner is not None for owner in owners) == opened.get(name, 8), name
            assert (tmp_path / "ablation" / f"routing_{name.replace('-', '_')}.png").is_file()
        else:
            assert "slot_read_weights" not in method["extra"]
    # equal parameters: the constant M consolidates as many as the reference arm's bank (+ the same generator)
    assert (methods["constant-m-equal-params"]["extra"]["trainable_params"]
            == methods["addressed-s4-frozen-mean"]["extra"]["trainable_params"])
