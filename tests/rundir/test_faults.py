"""Faults a user or a machine causes: files deleted under a running run, and a full disk at every write
(metrics, config, checkpoint, cache entry, figures and their data). Each ends in one line naming the path and
leaves the last good state as it was."""
import errno
import os
import subprocess
import sys

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from test_integrity import RECIPE, entry  # noqa: E402

from opdlab.app import cli, plots  # noqa: E402
from opdlab.errors import UserError  # noqa: E402
from opdlab.files import check_digest, write_atomic  # noqa: E402
from opdlab.lm import cache  # noqa: E402
from opdlab.rundir.writer import RunLog  # noqa: E402
from opdlab.training.loop import train  # noqa: E402
from rundirs import CONFIG, HOLD, MODELS, RT, SMALL, TASK, cut, metrics  # noqa: E402

ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What safetensors raises on a full disk (measured on a 200 kB tmpfs)."""


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the OS raises it from a write: no file name


def safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError
    raise SafetensorError(ENOSPC_TEXT)


def one_line(capsys, path):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "no space left on device" in err and f"({path})" in err, err
    return err


# -- the lock ----------------------------------------------------------------------------------------------------
def test_deleting_any_file_of_a_run_directory_never_lets_a_second_writer_in(tmp_path, capsys):
    run_dir = cut(tmp_path)  # a run directory with every kind of file: metrics, config, checkpoint, lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD % repr(SMALL), str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        files = sorted(p for p in run_dir.rglob("*") if p.is_file())
        assert run_dir / "lock" in files and run_dir / "checkpoint" / "model.safetensors" in files
        for path in files:  # the usual reflex with a stale-looking lock, and every other file after it
            path.unlink()
            with pytest.raises(UserError, match=f"{run_dir} is being written by another process"):
                RunLog(run_dir, CONFIG)
        assert cli.main(["train", str(run_dir), "-q", "-p", "device", "cpu"]) == 2
        assert "one writer at a time" in capsys.readouterr().err
    finally:
        holder.communicate("")
    # counterfactual: the lock the directory held before was on the file `lock`; a lock on a file that can be
    # deleted lets a second writer in
    import fcntl
    first = os.open(tmp_path / "file-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (tmp_path / "file-lock").unlink()
    second = os.open(tmp_path / "file-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no BlockingIOError: two "holders" at once
    os.close(first), os.close(second)
    with RunLog(run_dir, CONFIG):  # the holder has ended: the kernel released its lock
        pass
    # a writer of an older version, which locked the file `lock` alone, is kept out as well
    older = os.open(run_dir / "lock", os.O_RDWR)
    fcntl.flock(older, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(UserError, match="being written by another process"):
        RunLog(run_dir, CONFIG)
    os.close(older)


def test_a_full_disk_while_the_command_line_writes_a_csv_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    assert cli.main(["toy", "--n-toys", "1", "-d", "jsd", "--csv", str(tmp_path / "toy.csv")]) == 2
    one_line(capsys, tmp_path / "toy.csv")


# -- a full disk ---------------------------------------------------------------------------------------------------
def test_a_full_disk_while_metrics_are_appended_names_the_file(tmp_path, monkeypatch, capsys):
    with RunLog(tmp_path / "run", CONFIG) as log:
        log.log({"step": 0, "kind": "eval", "x": 1.0})
        before = log.metrics_path.read_bytes()
        monkeypatch.setattr(os, "write", full_disk)
        with pytest.raises(OSError) as err:
            log.log({"step": 1, "kind": "train", "x": 2.0})
        monkeypatch.undo()
        assert err.value.filename == str(log.metrics_path) and log.metrics_path.read_bytes() == before
        assert str(log.metrics_path) in cli._os_message(err.value)


def test_a_full_disk_while_a_file_is_rewritten_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as err:
        write_atomic(path, "new")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("where", ["weights", "state"])
def test_a_full_disk_while_a_checkpoint_is_saved_keeps_the_last_one(tmp_path, monkeypatch, capsys, where):
    run_dir = cut(tmp_path)  # checkpoint at step 2; the next one is due at step 4
    before = check_digest(run_dir / "checkpoint")
    if where == "weights":
        monkeypatch.setattr("transformers.modeling_utils.safe_save_file", safetensors_full)
    else:
        real = __import__("pathlib").Path.write_bytes
        monkeypatch.setattr("pathlib.Path.write_bytes",
                            lambda self, data: full_disk() if self.name == "state.pt" else real(self, data))
    with pytest.raises(OSError) as err:
        train(CONFIG, run_dir, RT, TASK, MODELS)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(run_dir / "checkpoint")
    assert check_digest(run_dir / "checkpoint") == before  # the last good checkpoint, verified, untouched
    assert torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    monkeypatch.undo()
    # the advice: free space and run the same command again; the run resumes and ends as an uninterrupted one
    train(CONFIG, run_dir, RT, TASK, MODELS)
    full = tmp_path / "full"
    train(CONFIG, full, RT, TASK, MODELS)
    assert metrics(run_dir).equals(metrics(full))


def test_a_full_disk_through_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    run_dir = cut(tmp_path)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", safetensors_full)
    monkeypatch.setattr("opdlab.training.loop.load_models", lambda *a, **k: MODELS)
    assert cli.main(["train", str(run_dir), "-q"]) == 2
    one_line(capsys, run_dir / "checkpoint")


def test_a_full_disk_while_a_cache_entry_is_written_keeps_the_old_entry(tmp_path, monkeypatch, capsys):
    def get():
        return cache.cached_model(TASK, RECIPE, "teacher", "cpu", tmp_path / "cache", eval_n=4, progress=False)

    get()
    path = entry(tmp_path)
    (path / "meta.json").write_text("{}")  # damaged: it will be trained again and written
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", safetensors_full)
    with pytest.raises(OSError) as err:
        get()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # as it was, nothing half-written
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary directory
    monkeypatch.undo()
    get()
    check_digest(path)


def test_a_full_disk_while_a_figure_or_its_data_is_saved_keeps_the_old_files(tmp_path, monkeypatch):
    fig = plt.figure()
    plt.plot([0, 1], [1, 0])
    paths = plots.save_figure(fig, "01_test", tmp_path)
    data = plots.save_data(pd.DataFrame({"x": [1, 2]}), "01_test", tmp_path)
    before = {p: p.read_bytes() for p in [*paths, data]}
    real_to_csv = pd.DataFrame.to_csv
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, path, **k: real_to_csv(self, path, **k) or full_disk())
    with pytest.raises(OSError) as err:
        plots.save_data(pd.DataFrame({"x": [3, 4, 5]}), "01_test", tmp_path)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(data)
    real_savefig = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, path, **k: real_savefig(self, path, **k) or full_disk())
    plt.plot([0, 1], [0, 1])
    with pytest.raises(OSError) as err:
        plots.save_figure(fig, "01_test", tmp_path)
    assert err.value.filename == str(paths[0])
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    plt.close(fig)
