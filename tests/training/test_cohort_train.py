"""Cohort training (opdlab.training.cohort_loop.train_cohort): R runs of mixed arms trained in lockstep, each in its
own run directory, end as each run alone ends, to float rounding, whatever the other members are; a run that fails fails
alone, with its error recorded; a kill -9 at any point leaves every run resumable to the uninterrupted result."""
import json
import random
import subprocess
import sys
import time

import pandas as pd
import pytest

from opdlab.errors import UserError
from opdlab.rundir.layout import ERROR as ERROR_FILE
from opdlab.rundir.reader import last_step, read_items, read_metrics
from opdlab.training import cohort
from opdlab.training.cohort_loop import train_cohort
from opdlab.training.loop import train
from rundirs import ENV, MODELS, TASK, wait_for_lock
from runs import make

pytestmark = pytest.mark.slow

SMALL = dict(steps=3, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=10, eval_every=2, eval_n=4,
             eval_samples=1, checkpoint_every=1, device="cpu", threads=1)
BASE, RT = make(**SMALL)
ARMS = [dict(divergence="reverse_kl", method="opd_plus", lr=3e-3, seed=0),
        dict(divergence="forward_kl", method="opd", log_u_clip=2.0, lr=1e-3, seed=1, grad_clip=0.05),
        dict(divergence="jsd", method="supervised_kd", lr=2e-3, seed=2, lr_schedule="cosine"),
        dict(divergence="jsd", method="opd_plus", baseline="loo", lr=5e-4, seed=3, steps=2)]
EXACT = ["step", "kind", "tokens", "completion_length", "eval_items"]  # counts: the same tokens drawn


def specs(arms):
    return [BASE.replace(**arm) for arm in arms]


def same(got: pd.DataFrame, want: pd.DataFrame):
    """Equal up to float rounding: the counts exactly (so the same tokens were drawn), every other number to 1e-5."""
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for col in got.columns:
        if col in EXACT or not pd.api.types.is_float_dtype(want[col]):
            assert got[col].equals(want[col]), col
        else:
            pd.testing.assert_series_equal(got[col], want[col], rtol=1e-5, atol=1e-6)


def metrics(run_dir):
    return read_metrics(run_dir, volatile=False).drop(columns="run")


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """Every arm trained alone by train.train: what a run inside a cohort must end with."""
    root, out = tmp_path_factory.mktemp("alone"), []
    for i, spec in enumerate(specs(ARMS)):
        train(spec, root / f"r{i}", RT, TASK, MODELS)
        out.append(metrics(root / f"r{i}"))
    return out


def test_runs_in_a_cohort_of_mixed_arms_end_as_they_do_alone(tmp_path, alone):
    dirs = [tmp_path / f"r{i}" for i in range(len(ARMS))]
    results = train_cohort(specs(ARMS), dirs, RT, TASK, MODELS)
    for got, want, d in zip(results, alone, dirs):
        same(got.drop(columns="run").filter(regex="^(?!time_)"), want)
        assert not (d / ERROR_FILE).exists() and len(read_items(d)["step"].unique()) == 2 + (d.name != "r3")
    # counterfactual: another run's metrics are not these
    with pytest.raises(AssertionError):
        same(metrics(dirs[0]), alone[1])


def test_replacing_the_other_members_changes_nothing_in_a_run(tmp_path, alone):
    others = [dict(divergence="tv", method="opd_plus", lr=1e-2, seed=7), dict(divergence="reverse_kl",
                                                                             method="opd", lr=1e-4, seed=8)]
    train_cohort(specs([ARMS[0]] + others), [tmp_path / "a", tmp_path / "b", tmp_path / "c"], RT, TASK, MODELS)
    same(metrics(tmp_path / "a"), alone[0])


def test_a_run_that_fails_fails_alone_with_its_error_recorded(tmp_path, alone, monkeypatch):
    from opdlab.training import loop as train_module

    real = train_module.evaluate_and_log

    def full_disk_for_r1(tr, log, tracker, step, final):
        if log is not None and log.dir.name == "r1" and step == 2:
            raise OSError(28, "No space left on device", str(log.dir / "items"))
        return real(tr, log, tracker, step, final)

    monkeypatch.setattr(train_module, "evaluate_and_log", full_disk_for_r1)
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    results = train_cohort(specs(ARMS[:3]), dirs, RT, TASK, MODELS)
    assert isinstance(results[1], OSError)
    record = json.loads((dirs[1] / ERROR_FILE).read_text())
    assert record["step"] == 2 and record["type"] == "OSError" and "No space left" in record["message"]
    for r in (0, 2):
        same(results[r].drop(columns="run").filter(regex="^(?!time_)"), alone[r])
    # the failed run resumes from its last checkpoint (step 1: its evaluation at step 2 failed before step 2's
    # checkpoint) once the disk has room, to the uninterrupted end
    monkeypatch.setattr(train_module, "evaluate_and_log", real)
    train_cohort(specs(ARMS[:3]), dirs, RT, TASK, MODELS)
    same(metrics(dirs[1]), alone[1])
    assert not (dirs[1] / ERROR_FILE).exists()


def test_when_the_shared_step_fails_each_run_goes_on_alone_and_says_so(tmp_path, alone, monkeypatch, capsys):
    real, calls = cohort.cohort_step, []

    def fails_at_step_1(trainers, step, score_together=None):
        calls.append(step)
        if step == 1:
            raise RuntimeError("a torch error in the stacked decoder")
        return real(trainers, step, score_together)

    monkeypatch.setattr(cohort, "cohort_step", fails_at_step_1)
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    results = train_cohort(specs(ARMS[:3]), dirs, RT, TASK, MODELS)
    assert calls == [0, 1]
    for got, want in zip(results, alone):
        same(got.drop(columns="run").filter(regex="^(?!time_)"), want)
    err = capsys.readouterr().err
    assert "shared step 2 failed (RuntimeError: a torch error in the stacked decoder)" in err and "Traceback" in err


def test_a_cohort_refuses_bad_input_before_any_work(tmp_path):
    with pytest.raises(UserError, match="one distinct run directory per spec"):
        train_cohort(specs(ARMS[:2]), [tmp_path / "a", tmp_path / "a"], RT, TASK, MODELS)
    with pytest.raises(UserError, match="share one task spec .* these differ: .*tool_use"):
        train_cohort([BASE, BASE.replace(task="tool_use")], [tmp_path / "a", tmp_path / "b"], RT, TASK, MODELS)
    with pytest.raises(UserError, match="these differ: .*max_new_tokens=12"):  # the completion budget is the task's
        train_cohort([BASE, BASE.replace(max_new_tokens=12)], [tmp_path / "a", tmp_path / "b"], RT, TASK, MODELS)
    with pytest.raises(UserError, match=r"completions per step .* these differ: .* 8\)"):
        train_cohort([BASE, BASE.replace(samples_per_prompt=4)], [tmp_path / "a", tmp_path / "b"], RT, TASK, MODELS)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


SCRIPT = """
import sys
from test_cohort_train import ARMS, RT, TASK, MODELS, specs
from opdlab.training.cohort_loop import train_cohort
runs = [s.replace(steps=2 * s.optim.steps + 4) for s in specs(ARMS)]
train_cohort(runs, [sys.argv[1] + f"/r{i}" for i in range(len(ARMS))], RT, TASK, MODELS)
"""


def test_kill_9_at_random_points_leaves_every_run_resumable_to_the_uninterrupted_end(tmp_path):
    import os

    env = {**ENV, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ENV.get("PYTHONPATH", "")])}

    def run(where, kill_after=None) -> float:
        """Seconds from taking the lock to the end (or the kill)."""
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(where)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        wait_for_lock(where / "r0", proc)
        t0 = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            proc.kill()
        err = proc.communicate()[1]
        assert kill_after is not None or proc.returncode == 0, err
        return time.perf_counter() - t0

    seconds = run(tmp_path / "full")
    steps = [2 * s.optim.steps + 4 for s in specs(ARMS)]
    rng, cut = random.Random(3), 0
    for _ in range(3):  # at random points of the first two thirds of what is left (a resume starts further on)
        run(tmp_path / "cut", kill_after=rng.uniform(0.0, 0.66 * seconds))
        cut += any(last_step(str(tmp_path / "cut" / f"r{i}")) < n for i, n in enumerate(steps))
    assert cut >= 2, cut  # the kills landed before the end, not after it
    run(tmp_path / "cut")
    for i in range(len(ARMS)):
        same(metrics(tmp_path / "cut" / f"r{i}"), metrics(tmp_path / "full" / f"r{i}"))


def test_a_run_that_cannot_start_is_returned_and_the_others_train(tmp_path, alone):
    """r1's directory is held by another writer: its error comes back (nothing recorded in a directory it could not
    take), the other runs end as they do alone."""
    from opdlab.rundir.writer import RunLog

    dirs = [tmp_path / f"r{i}" for i in range(3)]
    with RunLog(dirs[1], specs(ARMS)[1]):
        results = train_cohort(specs(ARMS[:3]), dirs, RT, TASK, MODELS)
    assert isinstance(results[1], UserError) and not (dirs[1] / ERROR_FILE).exists()
    for r in (0, 2):
        same(results[r].drop(columns="run").filter(regex="^(?!time_)"), alone[r])


def test_ctrl_c_while_a_cohort_sets_up_says_how_to_resume_and_releases_every_run(tmp_path, monkeypatch):
    """An interrupt while the runs are being taken up (a checkpoint loading, say) is ``loop.Interrupted`` naming
    the runs, not a bare KeyboardInterrupt, and leaves no run directory locked: the cohort starts again."""
    from opdlab.training import cohort_loop as cohort_train
    from opdlab.training.loop import Interrupted

    dirs, begin, calls = [tmp_path / f"r{i}" for i in range(3)], cohort_train.begin, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return begin(*args, **kwargs)
    monkeypatch.setattr(cohort_train, "begin", interrupted_second)
    with pytest.raises(Interrupted, match="setting up run 2 of the cohort's 3") as raised:
        train_cohort(specs(ARMS[:3]), dirs, RT, TASK, MODELS)
    assert all(str(d) in str(raised.value) for d in dirs)
    monkeypatch.setattr(cohort_train, "begin", begin)
    results = train_cohort(specs(ARMS[:3]), dirs, RT, TASK, MODELS, stop_after=1)
    assert all(isinstance(r, pd.DataFrame) for r in results)
