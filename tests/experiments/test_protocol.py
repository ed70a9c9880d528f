"""The learning-rate protocol (opdlab.experiments.protocol): every arm x rate at a seed no result uses, scored on validation
items only, the best rate chosen per arm, and applied only to arms of the same design."""
import pandas as pd
import pytest

from opdlab.config.presets import get
from opdlab.config.runtime import Runtime
from opdlab.errors import UserError
from opdlab.experiments import protocol
from opdlab.tasks import get_task
from opdlab.training.step import eval_examples

SMOKE = get("smoke").spec.replace(final_eval_n=12)
ARMS = [{"divergence": "forward_kl", "method": "opd_plus"}, {"divergence": "jsd", "method": "opd", "steps": 1}]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocol")
    runtime = Runtime(cache=str(tmp / "cache"), device="cpu", progress=False)
    return protocol.choose_lr(SMOKE, ["arithmetic"], ARMS, [1e-3, 1e-2], tmp / "runs", runtime, workers=1), tmp


def test_one_choice_per_arm_from_validation_items(table):
    t, tmp = table
    assert len(t) == 4 and t.groupby("arm")["chosen"].sum().eq(1).all()
    assert (t["items"] == 12).all()
    best = t.loc[t.groupby("arm")["validation_accuracy"].idxmax()]
    assert set(best["arm"]) == set(t.loc[t["chosen"], "arm"])
    for run in (tmp / "runs").iterdir():
        if run.name != "references":
            config = pd.read_json(run / "config.json", typ="series")
            assert config["eval_split"] == "validation" and config["seed"] == protocol.PROTOCOL_SEED


def test_validation_items_are_never_test_items():
    task = get_task("arithmetic")
    test = {ex.prompt for ex in eval_examples(task, 2000)}
    validation = {ex.prompt for ex in eval_examples(task, 2000, split="validation")}
    assert validation and not test & validation


def test_apply_sets_the_chosen_rate_only_for_the_same_design(table):
    t, _ = table
    arms, missing = protocol.apply(SMOKE.replace(task="arithmetic"), ARMS, t)
    assert missing == [] and all("lr" in a for a in arms)
    chosen = t[t["chosen"]].set_index("arm")["lr"]
    assert arms[0]["lr"] == chosen["OPD+ forward KL"]
    arms, missing = protocol.apply(SMOKE.replace(task="arithmetic", prompts_per_step=8), ARMS, t)
    assert missing == ["OPD+ forward KL", "stop-gradient Jensen-Shannon"] and not any("lr" in a for a in arms)
    assert protocol.apply(SMOKE, ARMS, None)[1] == ["OPD+ forward KL", "stop-gradient Jensen-Shannon"]


def test_the_protocol_refuses_what_it_cannot_choose(tmp_path):
    with pytest.raises(UserError, match="positive learning rates"):
        protocol.choose_lr(SMOKE, ["arithmetic"], ARMS, [], tmp_path)
    with pytest.raises(UserError, match="sets its own lr"):
        protocol.choose_lr(SMOKE, ["arithmetic"], [{**ARMS[0], "lr": 1e-3}], [1e-3], tmp_path)
    with pytest.raises(UserError, match="20000"):
        SMOKE.replace(seed=20_000)


def test_design_sets_aside_rate_seed_and_evaluation_only():
    spec = get("notebook04").spec
    assert protocol.design(spec) == protocol.design(spec.replace(lr=0.5, seed=3, final_eval_n=64, eval_n=16,
                                                                 eval_split="validation", eval_every=7))
    for changed in (dict(steps=10), dict(prompts_per_step=8), dict(baseline="loo"), dict(teacher_hidden=64)):
        assert protocol.design(spec.replace(**changed)) != protocol.design(spec), changed


def test_run_names_written_before_eval_split_and_final_eval_sampled_existed_still_resolve():
    from opdlab.config.spec import run_name

    spec = get("notebook04").spec.replace(divergence="reverse_kl", method="opd_plus", seed=0, final_eval_sampled=True)
    assert run_name(spec) == "arithmetic-reverse_kl-opd_plus-s0-0b9b5a0b"  # a run directory of 2026-12-04
    assert run_name(spec.replace(eval_split="validation")) != run_name(spec)
    assert run_name(spec.replace(final_eval_sampled=False)) != run_name(spec)
