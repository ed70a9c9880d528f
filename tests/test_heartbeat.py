"""Plain progress lines during long phases: at most one per interval, none when disabled, and the sweep's
reading of a running run's step from its metrics."""
import json

import pytest

from opdlab import heartbeat
from opdlab.config.recipe import ModelRecipe
from opdlab.heartbeat import Heartbeat
from opdlab.lm.cache import cached_model
from opdlab.rundir.reader import last_step as _last_step
from opdlab.tasks import get_task


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_a_line_only_when_the_interval_has_passed(capsys):
    clock = Clock()
    beat = Heartbeat(every=20, clock=clock)
    assert beat.remaining() == 20 and not beat.beat(lambda: "too early")
    clock.t += 19.5
    assert beat.remaining() == pytest.approx(0.5) and not beat.beat(lambda: "still too early")
    clock.t += 0.5
    assert beat.remaining() == 0 and beat.beat(lambda: "step 7/100")
    assert not beat.beat(lambda: "just printed")  # the interval starts again
    clock.t += 25
    beat.reset()  # a line of the caller's own
    assert not beat.beat(lambda: "after a reset")
    assert capsys.readouterr().out == "step 7/100\n"


def test_disabled_never_prints_nor_formats(capsys):
    clock = Clock()
    beat = Heartbeat(enabled=False, every=0, clock=clock)
    clock.t += 1000
    assert not beat.beat(lambda: 1 / 0)  # the message is never built
    assert capsys.readouterr().out == ""


def test_the_default_interval_is_the_module_constant_and_below_30_seconds(monkeypatch):
    assert Heartbeat().every == heartbeat.EVERY < 30
    monkeypatch.setattr(heartbeat, "EVERY", 0.5)
    assert Heartbeat().every == 0.5


@pytest.mark.parametrize("bad", [-1, "20", [20], True, float("nan")])
def test_bad_intervals_are_refused(bad):
    with pytest.raises(ValueError, match="every must be"):
        Heartbeat(every=bad)


def test_last_step_of_a_run_skips_a_torn_line(tmp_path):
    assert _last_step(str(tmp_path / "not-there")) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert _last_step(str(run)) == 0
    lines = [json.dumps({"step": 0, "kind": "eval"}), json.dumps({"step": 1, "kind": "train"})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 2, "kind": "tr')
    assert _last_step(str(run)) == 1


def test_supervised_training_of_a_cache_miss_prints_its_step_and_loss(tmp_path, monkeypatch, capsys):
    """A teacher trained for minutes says how far it is between its first and last line (here at every
    step: interval 0)."""
    monkeypatch.setattr(heartbeat, "EVERY", 0.0)
    recipe = ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32, sft_steps=3, sft_batch=4, max_len=64)
    cached_model(get_task("arithmetic"), recipe, "teacher", "cpu", tmp_path, eval_n=4, progress=True)
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("teacher SFT (arithmetic): step ")]
    assert [line.split(",")[0] for line in steps] == [f"teacher SFT (arithmetic): step {i}/3" for i in (1, 2, 3)]
    cached_model(get_task("arithmetic"), recipe, "teacher", "cpu", tmp_path / "other", eval_n=4, progress=False)
    assert capsys.readouterr().out == ""  # another cache miss, trained without progress: no line at all


def test_a_warm_up_that_may_stop_at_its_target_says_at_most(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(heartbeat, "EVERY", 0.0)
    recipe = ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32, sft_steps=2, sft_batch=4, max_len=64,
                         sft_target=0.99)
    cached_model(get_task("arithmetic"), recipe, "student", "cpu", tmp_path, eval_n=4, progress=True)
    assert "student SFT (arithmetic): step 1 of at most 2, loss " in capsys.readouterr().out


def test_running_runs_are_those_whose_metrics_were_written_since_the_wait_began(tmp_path):
    """The pool marks one queued run as running too; a queued run may hold metrics of an earlier sweep."""
    import os
    import time

    from opdlab.config.spec import RunSpec
    from opdlab.experiments.sweep import _running

    old, new, bare = tmp_path / "old", tmp_path / "new", tmp_path / "bare"
    for d, steps in ((old, 2), (new, 3)):
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(steps)))
    os.utime(old / "metrics.jsonl", (1_000, 1_000))
    since = time.time() - 60
    config = RunSpec.from_dict(dict(steps=10))
    line = _running(3, 8, [(config, str(old)), (config, str(new)), (config, str(bare))], since)
    assert line == "3/8 runs done; running: new step 2/10", line
    assert _running(0, 8, [(config, str(old)), (config, str(bare))], since) == "0/8 runs done; running: (starting)"
