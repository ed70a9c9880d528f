"""Run directories that never lose or mix data: one writer, whole lines, atomic rewrites, fingerprints, orphans;
and real interruptions (SIGINT, kill -9 at random points) of real `opdlab train` processes."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from opdlab.app import cli
from opdlab.config.spec import run_name
from opdlab.errors import UserError
from opdlab.rundir.reader import read_metrics, read_records
from opdlab.rundir.writer import RunLog
from opdlab.tasks import get_task
from opdlab.training.loop import train
from opdlab.training.step import Models
from rundirs import (CLI_FIELDS, CONFIG, ENV, HOLD, MODELS, RT, SMALL, TASK, TOK, cut, metrics, params, tiny,
                     wait_for_lock)
from runs import make


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted run of CONFIG: the reference every interrupted run must end equal to."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train(CONFIG, run_dir, RT, TASK, MODELS)
    return metrics(run_dir)


# -- one writer ------------------------------------------------------------------------------------------------
def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, full, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD % repr(SMALL), str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"being written by another process \\(pid {holder.pid}\\)"):
            train(CONFIG, run_dir, RT, TASK, MODELS)
        assert cli.main(_train_argv(run_dir)) == 2
        assert "one writer at a time" in capsys.readouterr().err
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert metrics(run_dir).equals(full)


# -- whole lines, atomic rewrites --------------------------------------------------------------------------------
def test_a_torn_last_line_is_dropped_with_a_message_and_the_run_resumes(tmp_path, full, capsys):
    run_dir = cut(tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "kind": "train", "loss": 0.12')  # kill -9 or a full disk mid-append
    assert read_metrics(run_dir)["step"].max() == 3
    assert "dropped a torn last line" in capsys.readouterr().err
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert metrics(run_dir).equals(full)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl, line 3: not a metrics record"):
        read_metrics(run_dir)


def test_two_records_of_one_step_are_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "kind": "eval"}\n{"step": 0, "kind": "eval"}\n')
    with pytest.raises(ValueError, match="lines 1 and 2: two eval records of step 0"):
        read_records(path)


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch, capsys):
    import errno

    log = RunLog(tmp_path / "run", CONFIG)
    log.log({"step": 0, "kind": "eval", "x": 1.0})
    before = log.metrics_path.read_bytes()
    real_write = os.write
    monkeypatch.setattr("opdlab.rundir.writer.os.write", lambda fd, data: real_write(fd, data[:7]))  # a full disk
    with pytest.raises(OSError) as err:
        log.log({"step": 1, "kind": "train", "x": 2.0})
    assert err.value.errno == errno.ENOSPC and log.metrics_path.read_bytes() == before
    assert cli._os_message(err.value).startswith("no space left on device")
    assert "free space on that disk and run the same command again" in cli._os_message(err.value)
    log.close()


def test_a_resume_rewrites_metrics_atomically_and_refuses_lost_metrics(tmp_path, full, monkeypatch):
    run_dir = cut(tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()

    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith("metrics.jsonl"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr("opdlab.rundir.writer.os.replace", killed)  # interrupted while the resume rewrites metrics.jsonl
        with pytest.raises(KeyboardInterrupt):
            train(CONFIG, run_dir, RT, TASK, MODELS)
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert not list(run_dir.glob(".*.tmp*"))
    (run_dir / "metrics.jsonl").write_text("")  # what a non-atomic rewrite could leave
    with pytest.raises(ValueError, match="does not hold the train records of steps 1..2"):
        train(CONFIG, run_dir, RT, TASK, MODELS)


def test_orphaned_temporary_checkpoints_are_removed_on_the_next_start(tmp_path, full):
    run_dir = cut(tmp_path)
    shutil.copytree(run_dir / "checkpoint", run_dir / "checkpoint.tmp99999")  # killed mid-checkpoint
    (run_dir / ".config.json.tmp99999").write_text("{")
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert not (run_dir / "checkpoint.tmp99999").exists() and not (run_dir / ".config.json.tmp99999").exists()
    assert metrics(run_dir).equals(full)


# -- fingerprints ----------------------------------------------------------------------------------------------
def test_a_run_resumes_only_under_its_own_fingerprint(tmp_path):
    run_dir = cut(tmp_path)
    (run_dir / "config.json").unlink()
    with pytest.raises(ValueError, match=r"differs in divergence \('reverse_kl' -> 'forward_kl'\)"):
        train(CONFIG.replace(divergence="forward_kl"), run_dir, RT, TASK, MODELS)
    with pytest.raises(ValueError, match=r"lr \(0.003 -> 0.01\)"):  # not the optimizer state's lr, silently
        train(CONFIG.replace(lr=1e-2), run_dir, RT, TASK, MODELS)
    (run_dir / "fingerprint.json").unlink()  # the checkpoint still knows
    with pytest.raises(ValueError, match=r"its checkpoint differs in divergence"):
        train(CONFIG.replace(divergence="forward_kl"), run_dir, RT, TASK, MODELS)
    other_teacher = Models(tiny(2), MODELS.student, TOK, {})  # same recipe, other weights
    with pytest.raises(ValueError, match="teacher weights"):
        train(CONFIG, run_dir, RT, TASK, other_teacher)


def test_a_run_recorded_before_a_config_field_existed_resumes_under_its_default(tmp_path, full):
    run_dir = cut(tmp_path)
    for name in ("config.json", "fingerprint.json"):  # as written before lr_schedule was a field
        record = json.loads((run_dir / name).read_text())
        (record.get("config", record)).pop("lr_schedule")
        (run_dir / name).write_text(json.dumps(record))
    state_path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["fingerprint"]["config"].pop("lr_schedule")
    state.pop("digested")  # and before checkpoints carried a digest
    torch.save(state, state_path)
    (run_dir / "checkpoint" / "digest.json").unlink()
    with pytest.raises(ValueError, match=r"lr_schedule \('constant' -> 'cosine'\)"):
        train(CONFIG.replace(lr_schedule="cosine"), run_dir, RT, TASK, MODELS)
    train(CONFIG, run_dir, RT, TASK, MODELS)  # the default is what the run did
    assert metrics(run_dir).equals(full)


def test_the_runtime_keeps_the_run_name_resumes_exactly_and_may_change_on_resume(tmp_path, full):
    spec, compiled = make(**SMALL, compile_decode=True)
    assert run_name(spec) == run_name(CONFIG)
    for runtime in (dict(cache="/elsewhere"), dict(device="cuda"), dict(threads=2), dict(checkpoint_every=7)):
        assert run_name(make(**{**SMALL, **runtime})[0]) == run_name(CONFIG)
    assert run_name(CONFIG.replace(lr=1e-2)) != run_name(CONFIG)  # the name does follow the spec
    train(CONFIG, tmp_path / "full", compiled, TASK, MODELS)
    train(CONFIG, tmp_path / "cut", compiled, TASK, MODELS, stop_after=3)
    train(CONFIG, tmp_path / "cut", compiled, TASK, MODELS)
    assert metrics(tmp_path / "cut").equals(metrics(tmp_path / "full"))  # resume is exact with it on
    run_dir = cut(tmp_path)  # started without it, resumed with it: no "differs in"
    train(CONFIG, run_dir, compiled, TASK, MODELS)
    assert metrics(run_dir)["step"].tolist() == full["step"].tolist()
    assert json.loads((run_dir / "run.json").read_text())["runtime"]["compile_decode"] is True


def test_a_run_directory_from_before_the_spec_runtime_split_resumes(tmp_path, full):
    """Directories written by TrainConfig carried cache, device, compile_decode and checkpoint_every in their
    config and fingerprint: they resume under the spec (those keys say how the run was computed, not what)."""
    run_dir = cut(tmp_path)
    legacy = {"cache": None, "device": "cpu", "compile_decode": False, "checkpoint_every": 2}
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, **legacy}))
    finger = json.loads((run_dir / "fingerprint.json").read_text())
    finger["config"].update(legacy)
    (run_dir / "fingerprint.json").write_text(json.dumps(finger))
    state_path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state["fingerprint"]["config"].update(legacy)
    state.pop("digested")  # written before checkpoints carried a digest, too
    torch.save(state, state_path)
    (run_dir / "checkpoint" / "digest.json").unlink()
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert metrics(run_dir).equals(full)


@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
def test_a_damaged_checkpoint_is_named(tmp_path, name):
    run_dir = cut(tmp_path)
    path = run_dir / "checkpoint" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=f"the checkpoint .*checkpoint does not match the digest .*{name} changed"
                                        ".*delete it .*to start the run over"):
        train(CONFIG, run_dir, RT, TASK, MODELS)
    (run_dir / "checkpoint" / "digest.json").unlink()  # as a checkpoint written before digests: read, and fails
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False) if name != "state.pt" else None
    if state is not None:
        state.pop("digested")
        torch.save(state, run_dir / "checkpoint" / "state.pt")
    with pytest.raises(UserError, match="the checkpoint .*checkpoint cannot be read .*delete it .*to start the run"):
        train(CONFIG, run_dir, RT, TASK, MODELS)


def test_a_non_finite_gradient_norm_stops_before_the_checkpoint(tmp_path, monkeypatch, capsys):
    import opdlab.training.loop as train_module

    real = train_module.opd_step

    def step(tr, i):
        m = real(tr, i)
        return {**m, "grad_norm": float("nan")} if i == 2 else m

    monkeypatch.setattr(train_module, "opd_step", step)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="step 3 .*gradient norm is nan.*last checkpoint: step 2"):
        train(CONFIG, run_dir, RT, TASK, MODELS)
    assert torch.load(run_dir / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    last = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    record = json.loads(last, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert record["grad_norm"] is None and record["nonfinite"] == ["grad_norm"]
    assert "non-finite grad_norm (logged as null)" in capsys.readouterr().err
    assert read_metrics(run_dir)["nonfinite"].tolist()[-1] == "grad_norm"


# -- bad input: one line, status 2 -----------------------------------------------------------------------------
def _train_argv(run_dir, **fields):
    return ["train", str(run_dir), *params({**SMALL, **fields})]


@pytest.mark.parametrize("fields, match", [
    (dict(lr="1e999"), "lr = inf is invalid"), (dict(device="cuda:x"), "device = 'cuda:x' is invalid"),
    (dict(teacher_path=3), "teacher_path = 3 is invalid"), (dict(compile_decode="yes"), "compile_decode = 'yes'"),
    (dict(preset="nope"), "unknown preset 'nope'"), (dict(stepz=3), "did you mean steps"),
])
def test_cli_train_refuses_bad_values(tmp_path, capsys, fields, match):
    assert cli.main(_train_argv(tmp_path / "run", **fields)) == 2
    err = capsys.readouterr().err
    assert err.startswith("opdlab train: error: ") and match in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cli_train_without_cuda(tmp_path, capsys):
    assert cli.main(_train_argv(tmp_path / "run", device="cuda")) == 2
    assert "CUDA is not available here; use 'auto' or 'cpu'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()  # a start that failed records nothing


def test_cli_train_refuses_bad_run_directories(tmp_path, capsys, monkeypatch):
    import errno

    assert cli.main(_train_argv("")) == 2
    assert "RUN_DIR is empty" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(_train_argv(tmp_path / "file")) == 2
    assert "is a file: expected a directory" in capsys.readouterr().err
    assert cli.main(_train_argv(tmp_path / "file" / "run")) == 2
    assert "a part of the path is a file, not a directory" in capsys.readouterr().err

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("opdlab.rundir.writer.os.open", read_only)  # root may write anywhere: stand in for a read-only disk
    assert cli.main(_train_argv(tmp_path / "ro")) == 2
    err = capsys.readouterr().err
    assert err == (f"opdlab train: error: read-only file system ({tmp_path / 'ro'}); the file system is "
                   "read-only: choose a path on a writable one\n")


def test_garbage_checkpoints_are_named(tmp_path, capsys):
    from opdlab.lm.modeling import load_model, save_model

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text('{"model_type": "nonsense"}')
    (tmp_path / "junk" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="junk is not a loadable model checkpoint"):
        load_model(tmp_path / "junk")
    save_model(tiny(0), TOK, tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").unlink()
    assert cli.main(["eval", str(tmp_path / "model"), "--task", "arithmetic", "--device", "cpu"]) == 2
    assert "does not match the digest recorded when it was written (tokenizer.json changed" \
        in capsys.readouterr().err
    (tmp_path / "model" / "digest.json").unlink()  # a checkpoint written by another program
    assert cli.main(["eval", str(tmp_path / "model"), "--task", "arithmetic", "--device", "cpu"]) == 2
    assert "no tokenizer beside the model at" in capsys.readouterr().err  # not sentencepiece
    assert cli.main(["eval", str(tmp_path / "model"), "--task", "arithmetic", "--device", "cuda:x"]) == 2
    assert "bad device 'cuda:x'" in capsys.readouterr().err


def test_a_character_tokenizer_is_refused_for_a_pretrained_task():
    pytest.importorskip("reasoning_gym")
    from opdlab.lm.tokenizer import check_task_tokenizer

    with pytest.raises(ValueError, match=r"turns \d+% of the tokens of task 'gsm_symbolic' into '<unk>'"):
        check_task_tokenizer(tiny(0), TOK, get_task("gsm_symbolic"), "char-model")


def test_a_notebook_that_raises_is_one_line(tmp_path, capsys):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("if n < 0:\n    raise ValueError(f'n = {n} must be >= 0')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "09_check.ipynb")
    argv = ["notebooks", str(tmp_path / "09_check.ipynb"), "-p", "n", "-1", "--output-dir", str(tmp_path), "-q"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"opdlab notebooks: error: 09_check.ipynb raised ValueError: n = -1 must be >= 0 (in cell [3] "
                   f"of the executed copy {tmp_path / '09_check.ipynb'}, with the full traceback)\n")


@pytest.mark.parametrize("temperature, ok", [(0.1, False), (0.001, False), (0.25, True), (1e5, False)])
def test_cli_toy_keeps_its_temperature_where_the_toys_are_exact(capsys, temperature, ok):
    code = cli.main(["toy", "-d", "jsd", "tv", "--n-toys", "20", "--temperature", str(temperature)])
    out, err = capsys.readouterr()
    if ok:
        assert code == 0 and [line.split()[2] for line in out.splitlines()[2:]] == ["1.000", "1.000"]
    else:
        assert code == 2 and "temperature must be a number in [0.25, 10000]" in err


# -- numerical domains -----------------------------------------------------------------------------------------
def test_log_probabilities_above_zero_masks_outside_0_1_and_empty_batches_are_refused():
    from opdlab.core.estimators import compute_advantages, reinforce_loss

    logp_BT = torch.log_softmax(torch.randn(3, 5, 7) * 30, -1)[..., 0]
    compute_advantages("reverse_kl", logp_BT, logp_BT.flip(0), None, "opd_plus", 0.5)  # log_softmax's own output passes
    above_BT = logp_BT.clone()
    above_BT[0, 0] = 0.5  # a probability of e^0.5 > 1: a logit passed by mistake
    with pytest.raises(ValueError, match="logp_teacher_BT has 1 entries above 0 .*must be <= 0"):
        compute_advantages("jsd", logp_BT, above_BT)
    for bad in (2.0, -1.0):
        mask_BT = torch.ones(3, 5)
        mask_BT[1, 2] = bad
        with pytest.raises(ValueError, match="mask_BT must hold only 0 and 1"):
            compute_advantages("jsd", logp_BT, logp_BT, mask_BT)
        with pytest.raises(ValueError, match="mask_BT must hold only 0 and 1"):
            reinforce_loss(logp_BT, torch.ones(3, 5), mask_BT)
    for shape in ((0, 5), (3, 0)):
        with pytest.raises(ValueError, match="empty batch"):
            compute_advantages("jsd", torch.zeros(shape), torch.zeros(shape), None, "opd", 0.5)


# -- real interruptions ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_argv(tmp_path_factory):
    """argv of a tiny `opdlab train` (models cached in a temporary directory), and its uninterrupted metrics."""
    root = tmp_path_factory.mktemp("cli")
    fields = {**CLI_FIELDS, "cache": str(root / "cache")}
    argv = [sys.executable, "-m", "opdlab", "train", "RUN_DIR", "-q", *params(fields)]
    done = subprocess.run([a.replace("RUN_DIR", str(root / "full")) for a in argv], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return argv, metrics(root / "full")


def _start(argv, run_dir):
    """A real ``opdlab train`` process. SIGINT is set back to its default in the child: a test suite started in
    the background of a non-interactive shell ignores SIGINT, and a child would inherit that and never see Ctrl-C."""
    return subprocess.Popen([a.replace("RUN_DIR", str(run_dir)) for a in argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_metrics(run_dir, proc, timeout=60):
    t0 = time.time()
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").stat().st_size:
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.02)


def _longer(argv, steps):
    """``argv`` with ``steps`` in place of its step count: a run long enough that a signal sent after its first
    metrics line lands mid-run however loaded the machine is."""
    argv = list(argv)
    at = next(i for i in range(len(argv) - 1) if argv[i] == "steps")
    argv[at + 1] = str(steps)
    return argv


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, cli_argv):
    argv = _longer(cli_argv[0], 30)
    done = subprocess.run([a.replace("RUN_DIR", str(tmp_path / "full")) for a in argv], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full = metrics(tmp_path / "full")
    run_dir = tmp_path / "run"
    proc = _start(argv, run_dir)
    _wait_for_metrics(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("opdlab train: interrupted: ")
    assert f"run `opdlab train {run_dir}` again to resume" in err
    resumed = subprocess.run([sys.executable, "-m", "opdlab", "train", str(run_dir), "-q"], env=ENV,
                             capture_output=True, text=True)  # no -p: the run's config.json is the truth
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run_dir).equals(full)


def test_kill_9_at_random_points_again_and_again_still_ends_equal(tmp_path, cli_argv):
    argv, full = cli_argv
    run_dir, rng = tmp_path / "run", random.Random(12)
    for _ in range(4):
        proc = _start(argv, run_dir)
        wait_for_lock(run_dir, proc)
        time.sleep(rng.uniform(0.0, 2.0))  # loading, sampling, evaluation, mid-checkpoint, between renames...
        proc.kill()
        proc.communicate()
    done = subprocess.run([a.replace("RUN_DIR", str(run_dir)) for a in argv], env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert metrics(run_dir).equals(full)
    assert not list(run_dir.glob("checkpoint.*")) and not list(run_dir.glob(".*.tmp*"))


def test_edited_per_item_records_are_refused_on_resume_and_the_advice_works(tmp_path, full):
    """The checkpoint holds the sha256 of the per-item records up to its step: an edited one is refused by name,
    and deleting the checkpoint, as the message says, starts the run over to the uninterrupted result."""
    import shutil

    run_dir = cut(tmp_path)  # checkpoint at step 2; evaluations at steps 0 and 2
    items = run_dir / "items" / "step_2.csv"
    frame = pd.read_csv(items)
    frame.loc[0, "correct"] = 1 - frame.loc[0, "correct"]  # one item's greedy result flipped
    frame.to_csv(items, index=False)
    with pytest.raises(UserError, match="per-item records of the evaluations up to step 2"):
        train(CONFIG, run_dir, RT, TASK, MODELS)
    shutil.rmtree(run_dir / "checkpoint")
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert metrics(run_dir).equals(full)


def test_a_run_directory_names_its_checkpoint_as_its_model(tmp_path):
    from opdlab.rundir import layout

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "before_layers"
    run = tmp_path / "run"
    shutil.copytree(fixture / "full", run)
    assert layout.model_dir(run) == run / "checkpoint"          # a run directory: its checkpoint
    assert layout.model_dir(run / "checkpoint") == run / "checkpoint"  # a model directory: itself
    shutil.rmtree(run / "checkpoint")
    with pytest.raises(FileNotFoundError, match="is a run directory without a checkpoint yet"):
        layout.model_dir(run)
    (run / "fingerprint.json").unlink()
    (run / "metrics.jsonl").unlink()
    assert layout.model_dir(run) == run                         # no longer a run: the path as given
