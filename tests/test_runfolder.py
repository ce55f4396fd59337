"""Run-folder safety: state files hold data only, names stay inside the folder, one live run, a
planted pickle is refused without running."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from metakv_cl.runfolder import (
    RunFolderError,
    UnsafeCheckpointError,
    atomic_write,
    atomic_write_text,
    check_folder_name,
    check_settings,
    load_checkpoint,
    load_state_file,
    remove_tree,
    run_lock,
    save_state_file,
)


def test_state_file_round_trips_tensors_and_plain_values(tmp_path):
    weight = torch.randn(4, 3)
    state = {
        "weights": {"a": weight, "tied": weight, "half": torch.arange(6, dtype=torch.bfloat16)[::2]},
        "cells": {(0, 1): 0.5, (1, 1): float("nan")},
        "by_index": {3: {"loss": 1.25}},
        "rng": (3, tuple(range(5)), None),
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.0),
        "rows": [[1.0, 2.5]],
        "nothing": torch.zeros(0),
        "looks_like_a_marker": {"__tensor__": "0"},
    }
    save_state_file(state, tmp_path / "s.safetensors")
    loaded = load_state_file(tmp_path / "s.safetensors")
    assert torch.equal(loaded["weights"]["a"], weight) and torch.equal(loaded["weights"]["tied"], weight)
    assert loaded["weights"]["half"].dtype == torch.bfloat16 and loaded["weights"]["half"].tolist() == [0, 2, 4]
    assert loaded["cells"][(0, 1)] == 0.5 and math.isnan(loaded["cells"][(1, 1)])
    assert loaded["by_index"] == {3: {"loss": 1.25}}
    assert loaded["rng"] == (3, (0, 1, 2, 3, 4), None)
    assert loaded["numpy"][1].dtype == np.uint32 and loaded["numpy"][1].tolist() == [0, 1, 2, 3, 4]
    assert loaded["rows"] == [[1.0, 2.5]] and loaded["nothing"].shape == (0,)
    assert loaded["looks_like_a_marker"] == {"__tensor__": "0"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left


def test_an_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path, reference = tmp_path / "report.json", tmp_path / "reference"
    reference.write_text("x")
    atomic_write_text("first", path)
    assert path.read_text() == "first"
    assert path.stat().st_mode == reference.stat().st_mode  # shared folders: not a private temp file's mode

    def full_disk(temporary):
        temporary.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, full_disk)
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "report.json"]


def test_state_file_names_what_it_cannot_store(tmp_path, planted):
    with pytest.raises(TypeError, match=r"state\.strategy\.memory is a PlantedPickle"):
        save_state_file({"strategy": {"memory": planted[0]}}, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_a_pickle_or_truncated_file_is_not_a_state_file(tmp_path, planted):
    payload, marker = planted
    path = tmp_path / "state.safetensors"
    torch.save({"format": 2, "evil": payload}, path)
    with pytest.raises(RunFolderError, match=r"state\.safetensors is not a readable state file"):
        load_state_file(path)
    assert not marker.exists()
    save_state_file({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RunFolderError, match="not a readable state file"):
        load_state_file(path)


def test_a_checkpoint_with_objects_is_refused_without_running_them(tmp_path, planted):
    payload, marker = planted
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt was refused: .*GLOBAL io\.open"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what loading used to do: the payload is live
    assert marker.exists()


def test_a_meta_kv_module_checkpoint_loads(tmp_path):
    from metakv_cl.modeling import MetaKVConfig

    path = tmp_path / "ok.ckpt"
    config = MetaKVConfig(rank=4, state_dim=16)
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"meta_kv": config, "betas": (0.9, 0.99)}}, path)
    loaded = load_checkpoint(path)
    assert loaded["hyper_parameters"]["meta_kv"] == config and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RunFolderError, match=r"ok\.ckpt is unreadable"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["../x", "..", ".", "/tmp/x", "a/b", "", "a\\b", "x y", None])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(name):
    with pytest.raises(ValueError, match=r"strategy name .* cannot be a folder name: use letters, digits"):
        check_folder_name(name, "strategy name")


def test_plain_folder_names_pass():
    for name in ("naive", "ewc-online", "metakv-replay-memory+generator", "v1.2_b"):
        assert check_folder_name(name, "strategy name") == name


def test_remove_tree_stays_inside_the_run_folder(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "keep"
    (root / "experiences" / "exp_000").mkdir(parents=True)
    outside.mkdir()
    for path in (root / "experiences" / ".." / ".." / "keep", root, tmp_path):
        with pytest.raises(ValueError, match="is not inside the run folder"):
            remove_tree(path, root)
    assert outside.is_dir() and root.is_dir()
    remove_tree(root / "experiences" / "exp_000", root)
    assert not (root / "experiences" / "exp_000").exists()


def test_a_second_live_run_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from metakv_cl.runfolder import run_lock
            with run_lock({str(tmp_path)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another live run \(pid {holder.pid}\)"):
            with run_lock(tmp_path):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path):  # the killed holder's lock went with it
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass


def test_resuming_with_other_settings_names_the_differing_keys(tmp_path):
    settings = {"model": {"init_args": {"lr": 0.003}}, "trainer": {"max_epochs": 2}, "strategies": [{"a": 1}]}
    check_settings(tmp_path, settings, resume=False)
    check_settings(tmp_path, settings, resume=True)
    changed = {"model": {"init_args": {"lr": 0.01}}, "trainer": {"max_epochs": 2}, "strategies": [{"a": 1}, {"b": 2}]}
    with pytest.raises(RunFolderError, match=r"model\.init_args\.lr: 0\.003 -> 0\.01; strategies\[1\]\.b: '<unset>' -> 2"):
        check_settings(tmp_path, changed, resume=True)
    check_settings(tmp_path, changed, resume=False)  # a fresh run records its own settings
    check_settings(tmp_path, changed, resume=True)
