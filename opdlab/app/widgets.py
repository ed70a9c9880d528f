"""Teaching widgets: thin ipywidgets views over the plain functions of ``opdlab.app.plots.teaching``.

In lecture order (notebook 05):

- ``divergence_explorer()``: pick a divergence and see f(u), the stop-gradient advantage -f(u), the OPD+
  advantage w_f(u) and their difference u f'(u) over a range of log u. Cheap, so it redraws on every change.
- ``categorical_playground()``: a student and a teacher over a handful of tokens (a seed and a temperature);
  bars of both, the exact gradient against the expected stop-gradient and OPD+ gradients, and a Monte Carlo
  estimate from N samples with its spread (drawn on a button).
- ``training_race()``: OPD and OPD+ trained side by side on the same toy; D_f over steps (run on a button).

Every widget is a ``VBox`` subclass whose controls are attributes named after what they set, so a test or a
notebook can set them and call ``update()``. A bad value (an unknown divergence, a parameter out of range)
shows a message in the widget's ``message`` area instead of raising; the last good figure stays up.
"""
from __future__ import annotations

import html
import warnings

import ipywidgets as widgets

from opdlab.app.plots import teaching as figures
from opdlab.core import divergences
from opdlab.exact import toy

__all__ = ["divergence_explorer", "DivergenceExplorer", "categorical_playground", "CategoricalPlayground",
           "training_race", "TrainingRace", "FAMILIES", "resolve_divergence"]

#: the parametrised families; a bare family name in a divergence box takes its parameter from the next box.
FAMILIES = ("gjsd", "alpha")
_LABEL = {"description_width": "initial"}  # show control labels in full ("temperature", not "temperat...")
_DIVERGENCE_CHOICES = tuple(n for n in divergences.names() if ":" not in n) + FAMILIES


def resolve_divergence(name: str, parameter: float) -> divergences.Divergence:
    """The divergence a widget's two boxes name: ``name`` itself, or ``"<family>:<parameter>"`` for a bare family.

    Raises UserError (with the registry's list of allowed names and ranges) for a bad choice.
    """
    key = (name or "").strip().lower()
    if key in FAMILIES:
        key = f"{key}:{parameter!r}"
    return divergences.get(key)


class _View(widgets.VBox):
    """Shared plumbing: a message area and ``_run``, which turns exceptions and warnings into messages.

    Subclasses set ``self.image`` (an ``ipywidgets.Image``) before calling this constructor.
    """

    def __init__(self, children, css_class: str):
        self.message = widgets.HTML(value="", layout=widgets.Layout(min_height="1.5em"))
        self.message.add_class("opdlab-message")
        # flex-start: children keep their natural width, so a figure is shown at its own size, not stretched
        super().__init__(children=[*children, self.message], layout=widgets.Layout(align_items="flex-start"))
        self.add_class("opdlab-widget")
        self.add_class(css_class)

    def _show(self, text: str, kind: str) -> None:
        color = {"error": "#b00020", "note": "#8a6d00"}[kind]
        self.message.value = f'<span class="opdlab-{kind}" style="color:{color}">{html.escape(text)}</span>'

    def _run(self, action) -> bool:
        """Call ``action()``; show a ValueError/TypeError or a warning as a message. True if it succeeded."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                action()
            except (ValueError, TypeError) as exc:
                kept = " (the figure still shows the last valid choice)" if len(self.image.value) else ""
                self._show(f"{exc}{kept}", "error")
                return False
        if caught:
            self._show(" ".join(dict.fromkeys(str(w.message) for w in caught)), "note")
        else:
            self.message.value = ""
        return True


def _divergence_boxes(divergence: str, parameter: float) -> tuple[widgets.Combobox, widgets.FloatText]:
    """The divergence name box (free text with suggestions) and the family-parameter box beside it."""
    family, _, value = divergence.partition(":")
    if family in FAMILIES:
        try:
            divergence, parameter = family, float(value)
        except ValueError:
            pass  # keep the text as typed; update() shows the registry's message
    name_box = widgets.Combobox(value=divergence, options=list(_DIVERGENCE_CHOICES), ensure_option=False,
                                description="divergence", style=_LABEL, continuous_update=False,
                                placeholder="e.g. forward_kl, gjsd:0.1, alpha:0.5")
    name_box.add_class("opdlab-divergence")
    parameter_box = widgets.FloatText(value=parameter, step=0.1, description="β or α", style=_LABEL,
                                      layout=widgets.Layout(width="180px"))
    parameter_box.add_class("opdlab-parameter")
    return name_box, parameter_box


def _toy_boxes(n_tokens: int, temperature: float, seed: int):
    """Sliders for the categorical toy of ``opdlab.exact.toy.make_categorical``: K, temperature and seed."""
    n_tokens_box = widgets.IntSlider(value=n_tokens, min=2, max=16, description="tokens K", style=_LABEL,
                                     continuous_update=False)
    n_tokens_box.add_class("opdlab-n-tokens")
    temperature_box = widgets.FloatSlider(value=temperature, min=0.25, max=4.0, step=0.05, continuous_update=False,
                                          description="temperature", style=_LABEL, readout_format=".2f")
    temperature_box.add_class("opdlab-temperature")
    seed_box = widgets.IntText(value=seed, description="seed", style=_LABEL, layout=widgets.Layout(width="180px"))
    seed_box.add_class("opdlab-seed")
    return n_tokens_box, temperature_box, seed_box


def _button(description: str, css_class: str) -> widgets.Button:
    button = widgets.Button(description=description, button_style="primary",
                            layout=widgets.Layout(width="auto"))
    button.add_class(css_class)
    return button


class DivergenceExplorer(_View):
    """f(u), -f(u), w_f(u) and u f'(u) against log u for the chosen divergence; redraws on every change.

    Controls: ``divergence`` (name, or a family ``gjsd``/``alpha`` whose parameter is ``parameter``),
    ``parameter``, ``log_u_range``. The figure is ``image``; ``formula`` shows f and w_f written out.
    """

    def __init__(self, divergence: str = "forward_kl", parameter: float = 0.5,
                 log_u_range: tuple[float, float] = (-3.0, 3.0)):
        self.divergence, self.parameter = _divergence_boxes(divergence, parameter)
        self.log_u_range = widgets.FloatRangeSlider(value=log_u_range, min=-8.0, max=8.0, step=0.25,
                                                    description="log u", style=_LABEL, continuous_update=False,
                                                    layout=widgets.Layout(width="420px"))
        self.log_u_range.add_class("opdlab-log-u-range")
        self.formula = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.image.add_class("opdlab-figure")
        super().__init__([widgets.HBox([self.divergence, self.parameter]), self.log_u_range, self.formula,
                          self.image], "opdlab-divergence-explorer")
        for control in (self.divergence, self.parameter, self.log_u_range):
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    def update(self) -> bool:
        """Redraw from the current controls; on a bad value show a message and keep the last figure."""
        def draw():
            div = resolve_divergence(self.divergence.value, self.parameter.value)
            low, high = self.log_u_range.value
            df = figures.advantage_curves_frame(div, low, high)
            self.image.value = figures.figure_png(figures.plot_advantage_curves(df))
            self.formula.value = (f"<b>{html.escape(div.label)}</b>: f(u) = {html.escape(div.f_expr)}, "
                                  f"&nbsp; w<sub>f</sub>(u) = {html.escape(div.w_expr)}")
        return self._run(draw)


def divergence_explorer(divergence: str = "forward_kl", parameter: float = 0.5,
                        log_u_range: tuple[float, float] = (-3.0, 3.0)) -> DivergenceExplorer:
    """The divergence explorer; the same figure as a plain call is
    ``plot_advantage_curves(advantage_curves_frame(divergence, *log_u_range))``."""
    return DivergenceExplorer(divergence, parameter, log_u_range)


class CategoricalPlayground(_View):
    """A student and a teacher over K tokens; the exact gradient against the two estimators.

    Changing the divergence or the toy (``n_tokens``, ``temperature``, ``seed``) redraws the exact part at
    once; ``sample_button`` (or ``sample()``) adds the mean of ``n_samples`` sampled gradients per method with
    its spread. The figure is ``plot_categorical(categorical_frame(...))``.
    """

    def __init__(self, divergence: str = "forward_kl", parameter: float = 0.5, n_tokens: int = 8,
                 temperature: float = 1.0, seed: int = 0, n_samples: int = 64):
        self.divergence, self.parameter = _divergence_boxes(divergence, parameter)
        self.n_tokens, self.temperature, self.seed = _toy_boxes(n_tokens, temperature, seed)
        self.n_samples = widgets.IntText(value=n_samples, description="samples N", style=_LABEL,
                                         layout=widgets.Layout(width="180px"))
        self.n_samples.add_class("opdlab-n-samples")
        self.sample_button = _button("draw N samples", "opdlab-sample")
        self.image = widgets.Image(format="png")
        self.image.add_class("opdlab-figure")
        super().__init__([widgets.HBox([self.divergence, self.parameter]),
                          widgets.HBox([self.n_tokens, self.temperature, self.seed]),
                          widgets.HBox([self.n_samples, self.sample_button]), self.image],
                         "opdlab-categorical-playground")
        for control in (self.divergence, self.parameter, self.n_tokens, self.temperature, self.seed):
            control.observe(lambda _change: self.update(), names="value")
        self.sample_button.on_click(lambda _button: self.sample())
        self.update()

    def _draw(self, n_samples: int | None) -> None:
        div = resolve_divergence(self.divergence.value, self.parameter.value)
        toy_ = toy.make_categorical(self.n_tokens.value, self.seed.value, self.temperature.value)
        df = figures.categorical_frame(div, toy_, n_samples=n_samples, seed=self.seed.value)
        self.image.value = figures.figure_png(figures.plot_categorical(df))

    def update(self) -> bool:
        """Redraw the exact part (distributions, exact and expected gradients) from the current controls."""
        return self._run(lambda: self._draw(None))

    def sample(self) -> bool:
        """Redraw with ``n_samples`` sampled gradients per method (seeded by ``seed``)."""
        return self._run(lambda: self._draw(self.n_samples.value))


def categorical_playground(divergence: str = "forward_kl", parameter: float = 0.5, n_tokens: int = 8,
                           temperature: float = 1.0, seed: int = 0, n_samples: int = 64) -> CategoricalPlayground:
    """The categorical playground; the same figure as a plain call is ``plot_categorical(categorical_frame(
    divergence, make_categorical(n_tokens, seed, temperature), n_samples, seed))``."""
    return CategoricalPlayground(divergence, parameter, n_tokens, temperature, seed, n_samples)


class TrainingRace(_View):
    """Stop-gradient OPD and OPD+ trained from the same toy with the same seed; runs on ``run_button``.

    Controls: the divergence, the toy (``n_tokens``, ``temperature``, ``seed``), ``steps``, ``lr`` and
    ``n_samples`` per step. The figure is ``plot_training_race(training_race_frame(...))``.
    """

    def __init__(self, divergence: str = "forward_kl", parameter: float = 0.5, n_tokens: int = 8,
                 temperature: float = 1.0, seed: int = 0, steps: int = 200, lr: float = 0.5,
                 n_samples: int = 16, run: bool = True):
        self.divergence, self.parameter = _divergence_boxes(divergence, parameter)
        self.n_tokens, self.temperature, self.seed = _toy_boxes(n_tokens, temperature, seed)
        narrow = widgets.Layout(width="200px")
        self.steps = widgets.IntText(value=steps, description="steps", style=_LABEL, layout=narrow)
        self.lr = widgets.FloatText(value=lr, step=0.1, description="learning rate", style=_LABEL, layout=narrow)
        self.n_samples = widgets.IntText(value=n_samples, description="samples/step", style=_LABEL, layout=narrow)
        for box, css in ((self.steps, "opdlab-steps"), (self.lr, "opdlab-lr"), (self.n_samples, "opdlab-n-samples")):
            box.add_class(css)
        self.run_button = _button("run the race", "opdlab-run")
        self.image = widgets.Image(format="png")
        self.image.add_class("opdlab-figure")
        super().__init__([widgets.HBox([self.divergence, self.parameter]),
                          widgets.HBox([self.n_tokens, self.temperature, self.seed]),
                          widgets.HBox([self.steps, self.lr, self.n_samples, self.run_button]), self.image],
                         "opdlab-training-race")
        self.run_button.on_click(lambda _button: self.update())
        if run:
            self.update()

    def update(self) -> bool:
        """Train both methods from the current controls and redraw (a message instead on a bad value)."""
        def race():
            div = resolve_divergence(self.divergence.value, self.parameter.value)
            toy_ = toy.make_categorical(self.n_tokens.value, self.seed.value, self.temperature.value)
            df = figures.training_race_frame(div, toy_, steps=self.steps.value, n_samples=self.n_samples.value,
                                             lr=self.lr.value, seed=self.seed.value)
            self.image.value = figures.figure_png(figures.plot_training_race(df))

        self.run_button.disabled, self.run_button.description = True, "running…"
        try:
            return self._run(race)
        finally:
            self.run_button.disabled, self.run_button.description = False, "run the race"


def training_race(divergence: str = "forward_kl", parameter: float = 0.5, n_tokens: int = 8,
                  temperature: float = 1.0, seed: int = 0, steps: int = 200, lr: float = 0.5,
                  n_samples: int = 16) -> TrainingRace:
    """The training race; the same figure as a plain call is ``plot_training_race(training_race_frame(
    divergence, make_categorical(n_tokens, seed, temperature), steps, n_samples, lr, seed))``."""
    return TrainingRace(divergence, parameter, n_tokens, temperature, seed, steps, lr, n_samples)
