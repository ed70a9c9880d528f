"""Notebook 04's questions and claims (opdlab.experiments.comparisons): labels, packing, the family of comparisons, and the
asserted claims on the committed data and on counterfactuals where they must fail."""
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from opdlab.core import objective
from opdlab.errors import UserError
from opdlab.experiments import comparisons, stats

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "figures" / "data"


def test_arm_labels():
    assert comparisons.arm_label("opd_plus", "forward_kl") == "OPD+ forward KL"
    assert comparisons.arm_label("opd", "jsd") == "stop-gradient Jensen-Shannon"
    assert comparisons.arm_label("opd_plus", "jsd", 1.0) == "OPD+ Jensen-Shannon, top-1 teacher"
    assert comparisons.arm_label("opd_plus", "jsd", float("nan")) == "OPD+ Jensen-Shannon"
    assert comparisons.arm_label("supervised_kd", "reverse_kl") == "supervised KD"


def test_pack_and_unpack_are_inverse(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame([dict(task="t", arm=a, seed=s, item=i, correct=int(rng.random() < 0.5))
                          for a in ("x", "y") for s in (0, 1) for i in range(37)])
    frame.loc[0:5, "correct"] = 0  # leading zeros: a plain read_csv would parse them away
    comparisons.pack_items(frame).to_csv(tmp_path / "p.csv", index=False)
    back = comparisons.unpack_items(comparisons.read_packed(tmp_path / "p.csv"))
    pd.testing.assert_frame_equal(back.sort_values(["arm", "seed", "item"]).reset_index(drop=True),
                                  frame.sort_values(["arm", "seed", "item"]).reset_index(drop=True),
                                  check_dtype=False)
    with pytest.raises(UserError, match="read_packed"):
        comparisons.unpack_items(pd.read_csv(tmp_path / "p.csv"))


def test_the_family_asks_a_to_f():
    Arm = comparisons.Arm
    rkl, fkl, jsd = Arm("opd_plus", "reverse_kl"), Arm("opd_plus", "forward_kl"), Arm("opd_plus", "jsd")
    stop, kd = Arm("opd", "forward_kl"), Arm("supervised_kd", "reverse_kl")
    full, topk = Arm("full_vocabulary", "reverse_kl"), Arm("opd_plus", "forward_kl", 1)
    qs = comparisons.questions([rkl, fkl, jsd, stop, kd, full, topk, comparisons.WARM_UP, comparisons.TEACHER])
    assert ("a", topk, comparisons.WARM_UP) in qs and ("a", kd, comparisons.WARM_UP) in qs
    assert ("b", stop, comparisons.WARM_UP) in qs
    assert not any(q in "af" and a.method == "opd" for q, a, _ in qs)
    assert ("c", fkl, rkl) in qs and ("c", jsd, rkl) in qs
    assert ("d", jsd, kd) in qs
    assert ("e", rkl, full) in qs and not any(q == "e" and a != rkl for q, a, _ in qs)
    assert ("f", topk, fkl) in qs and ("f", topk, full) in qs
    assert not any(b == comparisons.WARM_UP and a == comparisons.TEACHER for _, a, b in qs)
    assert len(qs) == 6 + 1 + 2 + 3 + 1 + 2  # a: every arm but stop-gradient; f: top-k against two


def test_arm_keys_come_from_the_runs_or_the_table():
    curves = pd.read_csv(DATA / "04_curves.csv")
    labels = list(curves["arm"].unique()) + [comparisons.WARM_UP]
    keys = comparisons.arm_keys(labels, curves)
    assert set(keys) == set(curves["arm"]) and comparisons.WARM_UP not in keys
    assert keys["OPD+ forward KL, top-1 teacher"] == comparisons.Arm("opd_plus", "forward_kl", 1)
    assert comparisons.arm_keys(labels) == keys  # the table's labels give the same keys
    assert all(key.label == label for label, key in keys.items())
    with pytest.raises(UserError, match="arms="):
        comparisons.arm_keys(["an arm nobody labels so"])
    with pytest.raises(UserError, match="does not name"):
        comparisons.arm_keys(["supervised KD"], curves[curves["method"] != "supervised_kd"])
    with pytest.raises(UserError, match="under one label"):
        comparisons.arm_keys(["supervised KD"], curves.assign(arm="supervised KD"))


def test_rewording_a_label_does_not_change_which_arms_are_compared(monkeypatch):
    """Counterfactual: the arm names reworded so that what a label's text says is misleading (OPD+ arms named
    like stop-gradient ones and back, the top-k suffix dropped into the middle): the same pairs of runs are
    compared with the same numbers, only under the new names."""
    curves, frame = pd.read_csv(DATA / "04_curves.csv"), _committed()
    keys = comparisons.arm_keys(frame["arm"].unique(), curves)
    before = comparisons.ask(frame, arms=curves)
    table = dict(objective.TABLE)
    for name, arm in (("opd_plus", "stop-gradient {divergence}"), ("opd", "OPD+ {divergence}"),
                      ("full_vocabulary", "{divergence} with every token")):
        monkeypatch.setitem(objective.TABLE, name, dataclasses.replace(table[name], arm=arm))
    monkeypatch.setattr(objective, "TOPK_ARM", "top-{k} {arm}")
    new = {label: key.label for label, key in keys.items()}
    assert new["OPD+ forward KL"] == "stop-gradient forward KL" and new["stop-gradient forward KL"] == "OPD+ forward KL"
    reworded = frame.assign(arm=frame["arm"].map(lambda a: new.get(a, a)))
    after = comparisons.ask(reworded, arms=curves.assign(arm=curves["arm"].map(new)))
    back = {v: k for k, v in new.items()}
    after = after.assign(a=after["a"].map(lambda a: back.get(a, a)), b=after["b"].map(lambda b: back.get(b, b)))
    columns = ["task", "question", "a", "b", "estimate", "p", "p_holm"]

    def rows(t):
        return t[columns].sort_values(columns[:4]).reset_index(drop=True)
    pd.testing.assert_frame_equal(rows(after), rows(before))
    assert set(before["question"]) == set("abcdef")  # every letter is asked: a rewording that moved one would show
    assert comparisons.arm_keys(reworded["arm"].unique()) == {new[k]: v for k, v in keys.items()}


def _committed():
    return comparisons.unpack_items(comparisons.read_packed(DATA / "04_items.csv"))


def _not_claimed():
    from opdlab.app.notebooks import notebook_parameters, resolve_notebook

    return notebook_parameters(resolve_notebook("04"))["not_claimed"]


def test_the_committed_claims_hold_and_the_tables_are_what_the_items_give():
    frame = _committed()
    table = comparisons.ask(frame)
    comparisons.check_claims(table, _not_claimed())  # the notebook's asserts, on its committed data
    with pytest.raises(UserError, match="not compared"):
        comparisons.claims(table, ["no such arm"])
    committed = pd.read_csv(DATA / "04_comparisons.csv")
    pd.testing.assert_frame_equal(table.reset_index(drop=True), committed, check_dtype=False, atol=1e-12)
    keyed = comparisons.ask(frame, arms=pd.read_csv(DATA / "04_curves.csv"))  # the runs' own keys: the same
    pd.testing.assert_frame_equal(keyed.reset_index(drop=True), committed, check_dtype=False, atol=1e-12)


def test_the_claims_fail_when_an_arm_is_no_better_than_the_warm_up():
    """Counterfactual: every trained arm's records replaced by the warm-up's (no real difference), and the
    stop-gradient arms' by the warm-up's: every claim (a) and (b) must fail."""
    frame = _committed()
    warm = frame[frame["arm"] == comparisons.WARM_UP]
    fake = [frame[frame["arm"].isin([comparisons.WARM_UP, comparisons.TEACHER])]]
    rng = np.random.default_rng(1)
    for arm in frame["arm"].unique():
        if arm in (comparisons.WARM_UP, comparisons.TEACHER):
            continue
        same = warm.assign(arm=arm).copy()
        flip = rng.random(len(same)) < 0.05  # some noise, no direction: a null arm
        same.loc[flip, "correct"] = 1 - same.loc[flip, "correct"]
        fake.append(same)
    table = comparisons.ask(pd.concat(fake, ignore_index=True))
    with pytest.raises(AssertionError) as err:
        comparisons.check_claims(table, _not_claimed())
    failed = str(err.value).count(" vs ")
    assert failed >= len(comparisons.claims(table, _not_claimed())) - 1, str(err.value)  # one false positive at most
    assert "stop-gradient" in str(err.value)


def test_the_claims_fail_when_stop_gradient_does_not_fall():
    frame = _committed()
    stop = frame["arm"].str.startswith("stop-gradient")
    warm = frame[frame["arm"] == comparisons.WARM_UP]
    lifted = [warm.assign(arm=a) for a in frame.loc[stop, "arm"].unique()]
    table = comparisons.ask(pd.concat([frame[~stop], *lifted], ignore_index=True))
    with pytest.raises(AssertionError, match="stop-gradient forward KL"):
        comparisons.check_claims(table, _not_claimed())


def test_gaps_have_intervals_around_their_estimates():
    arms = pd.read_csv(DATA / "04_arms.csv")
    trained = arms.dropna(subset=["gap_closed"])
    assert len(trained) and (trained["gap_lo"] <= trained["gap_closed"]).all()
    assert (trained["gap_closed"] <= trained["gap_hi"]).all()


def test_notebook_09_claims_hold_on_its_data_and_fail_on_a_counterfactual():
    from opdlab.app.notebooks import notebook_parameters, resolve_notebook

    p = notebook_parameters(resolve_notebook("09"))
    variance = pd.read_csv(DATA / "09_noise.csv")
    claims = comparisons.variance_claims(variance).set_index("claim")
    asserted = claims.drop(index=p["not_claimed"])
    assert len(asserted) and asserted["holds"].all()  # the notebook's asserts, on its committed data
    committed = pd.read_csv(DATA / "09_claims.csv").set_index("claim")
    pd.testing.assert_series_equal(claims["ratio"], committed["ratio"], check_dtype=False)
    # counterfactual: γ = 1 measured as γ = 0 plus independent noise of the size the batches show (no real
    # difference): its claim must not hold, at the nominal rate
    rng, held = np.random.default_rng(0), 0
    for _ in range(40):
        same = variance.copy()
        for _, part in variance.groupby(["baseline", variance["log_u_clip"].fillna(-1)]):
            zero = part[part["gamma"] == 0.0].iloc[0]
            loo = np.array([float(x) for x in zero["log_relative_variance_loo"].split()])
            noise = rng.normal(0, loo.std() + 1e-3, len(loo))
            row = part[part["gamma"] == 1.0].index[0]
            same.loc[row, "log_relative_variance_loo"] = " ".join(str(x) for x in loo + noise)
            same.loc[row, "relative_variance"] = float(np.exp(np.mean(loo + noise)))
        held += comparisons.variance_claims(same).set_index("claim").loc["γ = 1 / γ = 0", "holds"]
    assert held <= 6, held  # a one-sided false claim at most ~2.5% of the time; 6 of 40 is far beyond it


def test_notebook_06_claims_reproduce_from_its_items_and_fail_for_an_arm_that_did_not_move():
    items = pd.read_csv(DATA / "06_items.csv")
    claims = comparisons.kl_claims(items, "opd_plus", "opd")
    pd.testing.assert_frame_equal(claims, pd.read_csv(DATA / "06_claims.csv"), check_dtype=False)
    assert len(claims) == 2 and claims["seeds"].min() >= 3  # the floor for notebook 06
    # the asserted claim: OPD+ after against its own step 0 (the other, against stop-gradient OPD, is reported)
    assert claims.set_index("b").loc["opd_plus before", "holds"]
    # counterfactual: an arm that did not move, its "after" its "before" plus symmetric noise of the size the
    # items show, seed by seed: the claim holds at most rarely (a one-sided test at 2.5%)
    before = items[(items["method"] == "opd_plus") & (items["step"] == 0)]
    rng, held = np.random.default_rng(0), 0
    for _ in range(40):
        after = before.assign(step=4, kl_reverse=before["kl_reverse"] + rng.normal(0, 0.5, len(before)))
        held += comparisons.kl_claims(pd.concat([before, after]), "opd_plus", None)["holds"].any()
    assert held <= 4, held
    # the stop-gradient runs of other seeds do not pair with these
    other = items.assign(seed=items["seed"].where(items["method"] != "opd", items["seed"] + 10))
    with pytest.raises(UserError, match="not on the same seeds and items"):
        comparisons.kl_claims(other, "opd_plus", "opd")
    # and a seed's records must cover every item
    with pytest.raises(UserError, match="missing for some seed and item"):
        comparisons.kl_claims(items.drop(items[(items["seed"] == 1) & (items["item"] == 0)].index), "opd_plus", "opd")


def test_jackknife_log_ratio_keeps_the_pairing_of_shared_batches():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1.0, (3, 8))  # the batches' noise, common to A and B
    own = rng.normal(0, 0.01, (3, 8))
    r = stats.jackknife_log_ratio(shared + 0.1 + own, shared, (shared + 0.1 + own).mean(1), shared.mean(1))
    assert r["p"] < 1e-3 and r["lo_ratio"] > 1  # the shared noise cancels: 0.1 is found
    same = stats.jackknife_log_ratio(shared, shared, shared.mean(1), shared.mean(1))
    assert same["estimate"] == 0 and same["p"] == 1.0
    with pytest.raises(UserError):
        stats.jackknife_log_ratio(shared[:, :1], shared[:, :1], [0, 0, 0], [0, 0, 0])
