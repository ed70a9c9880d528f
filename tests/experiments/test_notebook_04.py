"""Notebook 04 runs end to end under papermill (tiny models, a few steps) and writes its figures and CSVs."""
import pandas as pd
import pytest

from opdlab.app.notebooks import execute_notebook
from opdlab.experiments import comparisons

pytestmark = pytest.mark.slow


def test_notebook_04_runs_with_small_parameters(tmp_path):
    figures = tmp_path / "figures"
    arms = [{"divergence": "reverse_kl", "method": "opd_plus"}, {"divergence": "forward_kl", "method": "opd_plus"},
            {"divergence": "forward_kl", "method": "opd", "steps": 1},
            {"divergence": "reverse_kl", "method": "supervised_kd"},
            {"divergence": "forward_kl", "method": "opd_plus", "teacher_topk": 1, "baseline": "tail"}]
    params = dict(figures_dir=str(figures), runs_dir=str(tmp_path / "runs"), cache=str(tmp_path / "cache"),
                  tasks=["arithmetic"], arms=arms, seeds=[0, 1], steps=2,
                  prompts_per_step=4, samples_per_prompt=2, eval_every=1, eval_n=8, final_eval_n=16, eval_samples=1,
                  teacher_hidden=32, teacher_layers=1, teacher_sft_steps=4, student_hidden=16, student_layers=1,
                  student_warmup_steps=2, device="cpu", assert_finding=False)
    execute_notebook("04", params, output_dir=tmp_path / "executed", progress=False)
    for name in ("04_accuracy", "04_divergence", "04_comparisons"):
        assert (figures / f"{name}.png").exists() and (figures / f"{name}.svg").exists()
    curves = pd.read_csv(figures / "data" / "04_curves.csv")
    assert set(curves["method"]) == {"opd", "opd_plus", "supervised_kd"} and set(curves["seed"]) == {0, 1}
    assert sorted(curves["step"].unique()) == [0, 1, 2]
    assert curves.loc[curves["method"] == "opd", "step"].max() == 1  # the arm's own steps
    items = comparisons.unpack_items(comparisons.read_packed(figures / "data" / "04_items.csv"))
    assert items.groupby(["arm", "seed"])["item"].nunique().eq(16).all()  # the final evaluation's items
    assert {comparisons.WARM_UP, comparisons.TEACHER, "OPD+ forward KL, top-1 teacher"} <= set(items["arm"])
    table = pd.read_csv(figures / "data" / "04_comparisons.csv")
    assert set(table["question"]) == {"a", "b", "c", "d", "f"} and table["p_holm"].between(0, 1).all()
