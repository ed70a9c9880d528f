"""Runtime.report_to: a run's metrics mirrored to TensorBoard read back equal to metrics.jsonl; the step's
throughput, entropy, EOS and truncation rates and the code version are recorded."""
import json
import math

import pytest
import torch
from test_train import SMALL, models_for_test

from opdlab.config.runtime import Runtime
from opdlab.errors import UserError
from opdlab.rundir.reader import read_metrics
from opdlab.tasks import get_task
from opdlab.training.loop import train
from runs import make

pytest.importorskip("tensorboard")


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_a_tensorboard_event_file_holds_the_json_lines_values(tmp_path):
    spec, runtime = make(**{**SMALL, "steps": 3, "eval_every": 3}, divergence="jsd", report_to=["tensorboard"])
    assert runtime.report_to == ("tensorboard",)
    train(spec, tmp_path / "run", runtime, get_task("arithmetic"), models_for_test())
    metrics = read_metrics(tmp_path / "run")
    scalars = _scalars(tmp_path / "run")
    checked = 0
    for record in metrics.to_dict("records"):
        for key in ("loss", "grad_norm", "entropy", "eos_rate", "truncation_rate", "greedy_accuracy",
                    "exact_divergence"):
            value = record.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            assert scalars[f"{record['kind']}/{key}"][record["step"]] == pytest.approx(value, rel=1e-6), key
            checked += 1
    assert checked >= 3 * 5 + 2 * 2  # every train step's five and both evaluations' two
    train_rows = metrics[metrics["kind"] == "train"]
    assert (train_rows["entropy"] > 0).all() and train_rows["eos_rate"].between(0, 1).all()
    assert (train_rows["eos_rate"] + train_rows["truncation_rate"] <= 1 + 1e-6).all()  # float32 means
    assert (train_rows["time_tokens_per_s"] > 0).all()
    versions = json.loads((tmp_path / "run" / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and "opdlab_commit" in versions


def test_a_max_new_tokens_budget_that_binds_is_counted_as_truncation(tmp_path):
    spec, runtime = make(**{**SMALL, "steps": 1, "max_new_tokens": 2})
    train(spec, tmp_path / "run", runtime, get_task("arithmetic"), models_for_test())
    row = read_metrics(tmp_path / "run").query("kind == 'train'").iloc[0]
    assert row["truncation_rate"] == pytest.approx(1 - row["eos_rate"]) and row["truncation_rate"] > 0.5


def test_an_unknown_tracker_is_refused_by_name():
    with pytest.raises(UserError, match="'wandb'.*allowed: tensorboard, trackio"):
        Runtime(report_to=["wandb"])
