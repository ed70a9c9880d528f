"""Notebook 04 runs end to end under papermill (tiny models, a few steps) and writes its figures and CSVs."""
import pandas as pd
import pytest

from opdlab.notebook_runner import execute_notebook

pytestmark = pytest.mark.slow


def test_notebook_04_runs_with_small_parameters(tmp_path):
    figures = tmp_path / "figures"
    params = dict(figures_dir=str(figures), runs_dir=str(tmp_path / "runs"), cache=str(tmp_path / "cache"),
                  tasks=["arithmetic"], divergences=["reverse_kl", "forward_kl"], seeds=[0, 1], steps=2,
                  extra_arms=[["reverse_kl", "supervised_kd"], ["reverse_kl", "opd_plus"]],
                  prompts_per_step=4, samples_per_prompt=2, eval_every=1, eval_n=8, eval_samples=1,
                  teacher_hidden=32, teacher_layers=1, teacher_sft_steps=4, student_hidden=16, student_layers=1,
                  student_warmup_steps=2, device="cpu", assert_finding=False)
    execute_notebook("04", params, output_dir=tmp_path / "executed", progress=False)
    for name in ("04_accuracy", "04_divergence"):
        assert (figures / f"{name}.png").exists() and (figures / f"{name}.svg").exists()
    curves = pd.read_csv(figures / "data" / "04_curves.csv")
    assert set(curves["method"]) == {"opd", "opd_plus", "supervised_kd"} and set(curves["seed"]) == {0, 1}
    assert sorted(curves["step"].unique()) == [0, 1, 2]
    final = pd.read_csv(figures / "data" / "04_final.csv")
    assert len(final) == 5 and {"mean", "ci", "teacher", "warm_up", "warm_up_high", "gap_closed"} <= set(final.columns)
