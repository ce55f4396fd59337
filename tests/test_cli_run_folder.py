"""metakv-cl fit/validate/compare and their run folder: interruptions, a busy folder, changed
settings on resume, planted files, strategy names that would leave the folder."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from metakv_cl.cli import INTERRUPTED_MESSAGE, main
from metakv_cl.runfolder import run_lock
from metakv_cl.training.testing import single_torch_thread, toy_config, write_config


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with single_torch_thread():
        yield


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_fit_with_a_message_and_keeps_finished_work(signum, status, tmp_path):
    root = tmp_path / "run"
    path = write_config(tmp_path, {**toy_config(root, max_epochs=500), "torch_num_threads": 1})
    checkpoint = root / "experiences" / "exp_000" / "train" / "last.ckpt"
    run = subprocess.Popen(
        [sys.executable, "-m", "metakv_cl.cli", "fit", "--config", path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.is_file() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert checkpoint.is_file(), "the first epoch never finished"
        run.send_signal(signum)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == status, err
    assert err.strip().splitlines()[-1] == INTERRUPTED_MESSAGE
    assert "Traceback" not in err
    assert checkpoint.is_file() and (root / "stream_state" / "state.safetensors").is_file()
    assert not (root / "report.json").exists()


def test_resume_with_changed_settings_is_refused_and_keeps_the_config(tmp_path, capsys):
    root = tmp_path / "run"
    path = write_config(tmp_path, toy_config(root))
    main(["fit", "--config", path])
    saved = (root / "config.yaml").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--ckpt_path", "last", "--trainer.max_epochs", "2",
              "--model.init_args.lr", "0.01", "--strategy.init_args.train_mb_size", "4"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for change in ("model.init_args.lr: 0.003 -> 0.01", "strategy.init_args.train_mb_size: 8 -> 4",
                   "trainer.max_epochs: 1 -> 2"):
        assert change in err
    assert (root / "config.yaml").read_bytes() == saved
    # how a run is shown is not a setting of its results
    main(["fit", "--config", path, "--ckpt_path", "last", "--trainer.enable_model_summary", "true"])


def test_a_second_run_in_a_busy_folder_is_refused(tmp_path, capsys):
    root = tmp_path / "run"
    path = write_config(tmp_path, toy_config(root))
    with run_lock(root):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", path])
    assert exit_info.value.code == 1
    assert f"{root} is in use by another live run (pid {os.getpid()})" in capsys.readouterr().err
    assert not (root / "config.yaml").exists()


def test_validate_refuses_planted_files_without_running_them(tmp_path, capsys, planted):
    payload, marker = planted
    root = tmp_path / "run"
    path = write_config(tmp_path, toy_config(root))
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": payload}, checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", path, "--ckpt_path", str(checkpoint)])
    assert exit_info.value.code == 1
    assert f"{checkpoint} was refused" in capsys.readouterr().err
    (root / "stream_state").mkdir(parents=True)
    torch.save({"format": 1, "evil": payload}, root / "stream_state" / "state.pt")
    with pytest.raises(SystemExit):
        main(["validate", "--config", path, "--ckpt_path", "last"])
    assert "state.pt is a pickle stream state" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", ".."])
def test_compare_refuses_a_strategy_name_that_leaves_the_folder(name, tmp_path, cli_error):
    root = tmp_path / "compare"
    config = toy_config(root)
    del config["strategy"]
    config["strategies"] = [
        {"class_path": "metakv_cl.strategies.Naive"},
        {"class_path": "metakv_cl.strategies.Naive", "init_args": {"name": name}},
    ]
    line = cli_error(["compare", "--config", write_config(tmp_path, config)])
    assert re.search(f"strategy name '{re.escape(name)}' cannot be a folder name: use letters", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare", "config.yaml"]
    assert not [p for p in root.iterdir() if p.is_dir()]  # refused before any strategy ran


WORKER_SCRIPT = """
import os, signal, threading, time
from torch.utils.data import DataLoader, Dataset
from metakv_cl.cli import Interrupted, _stop_on_signals

class Slow(Dataset):
    def __len__(self): return 1000
    def __getitem__(self, i): time.sleep(0.05); return i

try:
    with _stop_on_signals():
        # plain lists, not tensors: a tensor crosses through a file descriptor served by a
        # thread in the worker, which prints a ConnectionResetError of its own when the main
        # process stops mid-transfer; that race is multiprocessing's, not this handler's
        batches = iter(DataLoader(Slow(), num_workers=2, collate_fn=list))
        next(batches)
        threading.Timer(0.3, lambda: os.killpg(os.getpgid(0), signal.SIGINT)).start()
        for _ in batches: pass
except Interrupted as stop:
    print("interrupted", stop.exit_status)
"""


def test_ctrl_c_with_dataloader_workers_stops_the_run_without_worker_tracebacks(tmp_path):
    """Ctrl-C reaches the whole process group: forked workers must stop quietly, not raise Interrupted."""
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                            start_new_session=True)
    assert result.stdout.strip() == "interrupted 130", result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_checkpoint_s_hyper_parameters_cannot_import_a_module_or_change_the_config(tmp_path, monkeypatch, capsys):
    """Lightning would merge a --ckpt_path file's hyper-parameters (its ``_class_path`` too) into the config."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "run"
    path = write_config(tmp_path, {**toy_config(root), "keep_checkpoints": True})
    main(["fit", "--config", path])
    trained = torch.load(sorted(root.rglob("last.ckpt"))[-1], weights_only=True)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": trained["state_dict"],
                "hyper_parameters": {"_class_path": "planted_module.Model", "lr": 0.5}}, checkpoint)
    capsys.readouterr()
    main(["validate", "--config", path, "--ckpt_path", str(checkpoint)])
    assert not marker.exists()
    assert "| 0: people |" in capsys.readouterr().out  # scored with the config's own model
