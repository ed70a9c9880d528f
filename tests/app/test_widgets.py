"""The teaching widgets: each builds, its callbacks redraw with non-default values, and a bad value shows a
message in the widget (never a traceback). The figures behind them come from plain calls."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from opdlab.app import widgets
from opdlab.app.plots import teaching as figures
from opdlab.exact import toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ok(view) -> None:
    assert "opdlab-error" not in view.message.value, view.message.value
    assert bytes(view.image.value).startswith(PNG_MAGIC)


def _error(view, *words: str) -> None:
    assert "opdlab-error" in view.message.value, view.message.value
    for word in words:
        assert word in html.unescape(view.message.value)


# -- divergence explorer ------------------------------------------------------------------------------------


def test_explorer_builds_and_redraws_on_every_control():
    view = widgets.divergence_explorer()
    _ok(view)
    assert "forward KL" in view.formula.value
    seen = {bytes(view.image.value)}
    view.divergence.value = "reverse_kl"
    view.log_u_range.value = (-1.0, 5.0)
    view.divergence.value = "alpha"
    view.parameter.value = 2.0
    view.divergence.value = "gjsd:0.1"  # a family with its parameter typed in
    _ok(view)
    assert "β=0.1" in view.formula.value
    seen.add(bytes(view.image.value))
    assert len(seen) == 2


@pytest.mark.parametrize("name, parameter, words", [
    ("kl_forward", 0.5, ["unknown divergence", "allowed", "forward_kl"]),
    ("gjsd", 1.5, ["[0, 1]", "1.5"]),
    ("alpha:abc", 0.5, ["must be a number"]),
])
def test_explorer_bad_values_show_a_message_and_keep_the_last_figure(name, parameter, words):
    view = widgets.divergence_explorer("jsd")
    before = view.image.value
    view.parameter.value = parameter
    view.divergence.value = name
    _error(view, *words)
    assert view.image.value == before
    view.divergence.value = "hellinger"  # a good value clears the message
    _ok(view)
    assert view.message.value == ""


@pytest.mark.parametrize("make", [widgets.divergence_explorer, widgets.categorical_playground,
                                  lambda name: widgets.training_race(name, steps=3)])
def test_a_bad_name_at_construction_is_a_message_too(make):
    view = make("alpha:abc")
    _error(view, "must be a number")
    assert "last valid choice" not in view.message.value  # there was no figure yet
    view.divergence.value = "alpha:2"
    if isinstance(view, widgets.TrainingRace):
        view.run_button.click()
    _ok(view)


def test_explorer_warning_is_a_note_not_an_error():
    view = widgets.divergence_explorer("gjsd:0")
    assert "opdlab-note" in view.message.value and "identically zero" in view.message.value
    assert view.message.value.count("identically zero") == 1


def test_resolve_divergence_names_a_family_by_its_parameter():
    assert widgets.resolve_divergence("alpha", 0.5).name == "alpha:0.5"
    assert widgets.resolve_divergence(" Forward_KL ", 9.0).name == "forward_kl"
    with pytest.raises(ValueError, match="allowed"):
        widgets.resolve_divergence("", 0.5)


def test_advantage_curves_frame_is_the_registry():
    df = figures.advantage_curves_frame("forward_kl", -2.0, 2.0, n_points=5)
    opd_plus = df[df["quantity"] == "opd_plus"]
    np.testing.assert_allclose(opd_plus["value"], opd_plus["u"])  # w_f(u) = u for forward KL
    gap = df[df["quantity"] == "error"]["value"].to_numpy()
    np.testing.assert_allclose(gap, opd_plus["value"].to_numpy() - df[df["quantity"] == "opd"]["value"].to_numpy())
    np.testing.assert_allclose(df[df["quantity"] == "f"]["value"], opd_plus["u"] * np.log(opd_plus["u"]))
    with pytest.raises(ValueError, match="min < max"):
        figures.advantage_curves_frame("jsd", 1.0, 1.0)


# -- categorical playground ---------------------------------------------------------------------------------


def test_playground_builds_redraws_and_samples():
    view = widgets.categorical_playground()
    _ok(view)
    exact_only = view.image.value
    assert view.sample()
    _ok(view)
    assert view.image.value != exact_only
    view.sample_button.click()  # the button is wired to sample()
    _ok(view)
    for control, value in ((view.divergence, "jsd"), (view.n_tokens, 4), (view.temperature, 0.5), (view.seed, 3)):
        before = view.image.value
        control.value = value
        _ok(view)
        assert view.image.value != before, control.description


@pytest.mark.parametrize("setting, words", [
    (("divergence", "kl"), ["unknown divergence"]),
    (("parameter", -0.2), ["[0, 1]"]),  # with divergence "gjsd"
    (("n_samples", 0), ["n_samples", ">= 1"]),
])
def test_playground_bad_values_show_a_message(setting, words):
    view = widgets.categorical_playground("gjsd", parameter=0.3)
    _ok(view)
    name, value = setting
    getattr(view, name).value = value
    if name == "n_samples":
        view.sample_button.click()
    _error(view, *words)


def test_categorical_frame_matches_the_toy():
    toy_ = toy.make_categorical(5, seed=1)
    df = figures.categorical_frame("forward_kl", toy_, n_samples=200, seed=0)
    by = {q: part.sort_values("token")["value"].to_numpy() for q, part in df.groupby("quantity")}
    np.testing.assert_allclose(by["exact"], toy.exact_gradient("forward_kl", toy_).numpy())
    np.testing.assert_allclose(by["expected_opd_plus"], by["exact"], atol=1e-12)  # OPD+ is unbiased
    stderr = df[df["quantity"] == "sampled_opd_plus"].sort_values("token")["stderr"].to_numpy()
    assert np.all(np.abs(by["sampled_opd_plus"] - by["exact"]) < 5 * stderr + 1e-12)
    np.testing.assert_allclose(by["p_student"].sum(), 1.0)


# -- training race ------------------------------------------------------------------------------------------


def test_race_builds_and_reruns_with_new_values():
    view = widgets.training_race(steps=20)
    _ok(view)
    before = view.image.value
    view.divergence.value, view.steps.value, view.lr.value, view.n_samples.value = "reverse_kl", 30, 0.3, 8
    view.run_button.click()
    _ok(view)
    assert view.image.value != before
    assert not view.run_button.disabled and view.run_button.description == "run the race"


@pytest.mark.parametrize("name, value, words", [
    ("lr", 0.0, ["learning rate", "positive"]),
    ("steps", -1, ["steps", ">= 0"]),
    ("n_samples", 0, ["n_samples"]),
    ("divergence", "alpha:inf", ["finite"]),
])
def test_race_bad_values_show_a_message(name, value, words):
    view = widgets.training_race(steps=5)
    getattr(view, name).value = value
    view.run_button.click()
    _error(view, *words)
    assert not view.run_button.disabled


def test_race_frame_shows_the_forward_kl_collapse():
    """The reference point of docs/math.md §3 as the race draws it: stop-gradient forward KL does not converge."""
    df = figures.training_race_frame("forward_kl", toy.make_categorical(8, seed=0), steps=100)
    final = df[df["step"] == 100].set_index("method")["D_f"]
    start = df[df["step"] == 0]["D_f"].iloc[0]
    assert final["opd_plus"] < 0.1 * start < start < final["opd"]


# -- notebook 05 headless -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_notebook_05_runs_under_papermill_and_saves_its_figures(tmp_path):
    """Papermill keeps no widget state: the figures of a headless run come from the plain calls."""
    import papermill as pm

    notebooks = Path(__file__).resolve().parents[2] / "notebooks"
    figures_dir = tmp_path / "figures"
    pm.execute_notebook(str(notebooks / "05_teaching.ipynb"), str(tmp_path / "05_teaching.ipynb"),
                        parameters=dict(divergence="alpha", parameter=0.5, n_tokens=5, steps=30, n_samples=16,
                                        figures_dir=str(figures_dir)),
                        cwd=str(notebooks), progress_bar=False, kernel_name="python3")
    for stem in ("05_advantage_curves", "05_categorical_gradients", "05_training_race"):
        assert (figures_dir / f"{stem}.png").stat().st_size > 0
        assert (figures_dir / "data" / f"{stem}.csv").exists()
    race = pd.read_csv(figures_dir / "data" / "05_training_race.csv")
    assert set(race["divergence"]) == {"alpha:0.5"} and race["step"].max() == 30
