"""Every remedy an error message of the run directory, the cache or the estimators suggests is followed here, and
shown to work: the run then resumes and ends as an uninterrupted one, or the call goes through."""
import json

import pytest
import torch

from opdlab.app import cli
from opdlab.core.estimators import compute_advantages, reinforce_loss
from opdlab.errors import UserError
from opdlab.training.loop import train
from rundirs import CONFIG, MODELS, RT, TASK, cut, metrics


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train(CONFIG, run_dir, RT, TASK, MODELS)
    return metrics(run_dir)


@pytest.fixture
def cli_models(monkeypatch):
    """`opdlab train` with the tiny in-memory models of test_rundir instead of the cache's."""
    monkeypatch.setattr("opdlab.training.loop.load_models", lambda *a, **k: MODELS)


def error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_hand_edited_config_json_is_named_and_deleting_it_resumes_the_run(tmp_path, full, cli_models, capsys):
    run_dir = cut(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    assert cli.main(["train", str(run_dir), "-q"]) == 2  # no -p: the loop the old advice led into
    err = error(capsys)
    assert "config.json was changed after the run started" in err and "lr (0.003 -> 0.5)" in err
    assert "without -p" not in err
    (run_dir / "config.json").unlink()  # the advice
    assert cli.main(["train", str(run_dir), "-q"]) == 0
    assert metrics(run_dir).equals(full)
    assert json.loads((run_dir / "config.json").read_text()) == config


def test_a_different_parameter_is_refused_and_resuming_without_it_works(tmp_path, full, cli_models, capsys):
    run_dir = cut(tmp_path)
    assert cli.main(["train", str(run_dir), "-q", "-p", "lr", "0.5"]) == 2
    assert "lr (0.003 -> 0.5)" in error(capsys)
    assert cli.main(["train", str(run_dir), "-q"]) == 0  # the advice: without -p
    assert metrics(run_dir).equals(full)


@pytest.mark.parametrize("name", ["config.json", "fingerprint.json", "versions.json", "run.json"])
def test_a_damaged_json_file_of_a_run_is_named_and_deleting_it_resumes(tmp_path, full, cli_models, capsys, name):
    run_dir = cut(tmp_path)
    (run_dir / name).write_text('{"half": ')
    if name in ("config.json", "fingerprint.json"):  # read before anything else
        assert cli.main(["train", str(run_dir), "-q"]) == 2
        err = error(capsys)
        assert f"{run_dir / name} is damaged" in err and "delete it" in err
    (run_dir / name).unlink()
    assert cli.main(["train", str(run_dir), "-q"]) == 0
    assert metrics(run_dir).equals(full)
    json.loads((run_dir / name).read_text())


def test_a_bad_metrics_line_after_the_checkpoint_may_be_deleted(tmp_path, full, cli_models, capsys):
    run_dir = cut(tmp_path)  # checkpoint at step 2, metrics of step 3 logged
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    third = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == 3)
    lines.insert(third, "garbage\n")
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    assert cli.main(["train", str(run_dir), "-q"]) == 2
    err = error(capsys)
    assert f"line {third + 1}: not a metrics record" in err and "delete it if its step is after" in err
    del lines[third]  # the advice: the bad line sits after the checkpoint's step 2
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    assert cli.main(["train", str(run_dir), "-q"]) == 0
    assert metrics(run_dir).equals(full)


def test_nan_at_a_masked_position_is_named_as_such_and_filling_it_works():
    logp_s = torch.log_softmax(torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0)), -1)[..., 0]
    logp_t = logp_s - 0.3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    padded = torch.where(mask > 0, logp_s, float("nan"))  # garbage where nothing was sampled
    with pytest.raises(UserError, match="all at masked positions .*fill masked positions with 0"):
        compute_advantages("jsd", padded, logp_t, mask)
    filled = torch.where(mask > 0, padded, 0.0)  # the advice
    adv = compute_advantages("jsd", filled, logp_t, mask)
    assert torch.isfinite(reinforce_loss(filled.requires_grad_(), adv.A_BT, mask))
    # counterfactual: the NaN the message guards against, had it been let through to the surrogate
    assert torch.isnan(reinforce_loss(padded, adv.A_BT, mask))
    unmasked = logp_s.clone()
    unmasked[0, 0] = float("nan")
    with pytest.raises(UserError, match="1 NaN and 0 infinite entries at positions that count") as err:
        compute_advantages("jsd", logp_s, torch.where(unmasked.isnan(), unmasked, logp_t), mask)
    message = str(err.value)
    assert "comes from the model that computed it" in message and "cannot have been sampled" not in message
    unmasked[0, 0] = float("-inf")
    with pytest.raises(UserError, match="0 NaN and 1 infinite .*clamp them") as err:
        compute_advantages("jsd", unmasked, logp_t, mask)
    compute_advantages("jsd", unmasked.clamp_min(-1e4), logp_t, mask)  # the advice


def test_a_nan_baseline_is_blamed_on_the_baseline_not_the_divergence():
    logp_s = torch.full((2, 3), -1.0)
    baseline = torch.zeros(2, 3)
    baseline[1, 2] = float("nan")
    with pytest.raises(UserError, match=r"the baseline b\(c_t\) has 1 NaN") as err:
        compute_advantages("forward_kl", logp_s, logp_s - 0.5, baseline_BT=baseline)
    assert "log_u_clip" not in str(err.value)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # where the token does not count, a baseline may be anything
    assert torch.isfinite(compute_advantages("forward_kl", logp_s, logp_s - 0.5, mask, baseline_BT=baseline).A_BT).all()
