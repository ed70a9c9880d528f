"""Notebooks 01-03, 07, 08 and 09 run headlessly with papermill (cwd = notebooks/) on tiny parameters, asserts
included."""
from pathlib import Path

import pytest

pm = pytest.importorskip("papermill")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

TINY_MODELS = dict(teacher_hidden=32, teacher_layers=1, teacher_sft_steps=4, student_hidden=16, student_layers=1,
                   student_warmup_steps=2)
"""RunSpec fields over notebooks 08's and 09's preset (the training notebooks take them in ``overrides``)."""
TINY = {
    "01_bias_derivation": dict(divergences=["reverse_kl", "forward_kl", "tv"], n_points=21),
    "02_categorical_toys": dict(divergences=["reverse_kl", "forward_kl", "jsd"], n_samples=[4, 64], n_repeats=30,
                                n_cosine_toys=5, train_divergences=["forward_kl"], train_steps=25),
    "03_sequences": dict(divergences=["reverse_kl", "forward_kl"], gammas=[0.0, 0.5, 1.0],
                         baselines=["none", "expected"], n_repeats=5, vocab_size=2, horizon=3),
    "07_estimator_audit": dict(n_toys=2, n_tokens=4, vocab_size=2, horizon=2, assert_finding=False),
    "08_estimator_noise": dict(prompts=4, n_resamples=3, overrides=TINY_MODELS, assert_finding=False),
    "09_variance_tradeoff": dict(gammas=[0.0, 1.0], baselines=["none", "expected"], seeds=[0, 1], n_batches=3,
                                 overrides=dict(TINY_MODELS, steps=2, prompts_per_step=2, samples_per_prompt=2,
                                                eval_n=8, final_eval_n=12), assert_finding=False),
}
FIGURES = {
    "01_bias_derivation": ["01_advantage_curves"],
    "02_categorical_toys": ["02_error_vs_samples", "02_variance", "02_cosines", "02_training"],
    "03_sequences": ["03_gamma_tradeoff"],
    "07_estimator_audit": ["07_cosine_heatmap", "07_cosine_heatmap_sequence"],
    "08_estimator_noise": ["08_cosine_vs_tokens", "08_log_u"],
    "09_variance_tradeoff": ["09_tradeoff", "09_noise"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs_with_tiny_parameters(name, tmp_path):
    figures = tmp_path / "figures"
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                        parameters=dict(TINY[name], figures_dir=str(figures), seed=1,
                                        **({"runtime": {"device": "cpu", "cache": str(tmp_path / "cache")}}
                                           if name[:2] in ("08", "09") else {}),
                                        **({"runs_dir": str(tmp_path / "runs")} if name.startswith("09") else {})),
                        cwd=str(NOTEBOOKS),
                        progress_bar=False, kernel_name="python3")
    for stem in FIGURES[name]:
        assert (figures / f"{stem}.png").stat().st_size > 0
        assert (figures / f"{stem}.svg").exists()
    assert list((figures / "data").glob(f"{name[:2]}_*.csv"))


def test_notebooks_are_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    for name in TINY:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, name
