"""The stop-gradient bias, derived with sympy for any f (OPD+ paper, arXiv 2606.01039, Sec. 3).

For a context with student pi_theta and teacher pi_T, ``u_a = pi_T(a) / pi_theta(a)`` and
``D_f = sum_a pi_theta(a) f(u_a)``. Since ``d u_a / d theta = -u_a grad log pi_theta(a)``,

    grad D_f = sum_a pi_theta(a) [ f(u_a) - u_a f'(u_a) ] grad log pi_theta(a)            (paper Eq. 5)

so the exact per-sample gradient weight is ``f - u f'``, the advantage to maximise is
``w_f = -f + u f'`` (OPD+, Eq. 7), and the stop-gradient advantage ``-f`` drops ``u f'(u)``: the
stop-gradient error. It vanishes in expectation when it is a constant (E[grad log pi] = 0), i.e. when
``d/du (u f'(u)) = 0``, whose solutions with f(1) = 0 and f convex are exactly ``f = -c log u``, c >= 0:
reverse KL and its multiples (``constant_error_solution``).

``derive`` does this for any f given as a sympy expression in ``U`` or as a string such as ``"u*log(u)"``;
``parse_f`` reads strings with an allow-list of names and never evaluates arbitrary code.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sympy as sp
import torch
from sympy.parsing.sympy_parser import convert_xor, parse_expr, standard_transformations

from opdlab.config.choices import REPRESENTATIVE_DIVERGENCES
from opdlab.core.divergences import Divergence, get
from opdlab.errors import UserError

__all__ = ["U", "Derivation", "parse_f", "derive", "constant_error_solution", "error_is_constant",
           "registry_expression", "REGISTRY_NAMES", "advantage_table", "advantage_curves", "check_f",
           "as_divergence"]

U = sp.Symbol("u", positive=True)
BETA, ALPHA = sp.Symbol("beta", positive=True), sp.Symbol("alpha", real=True)
REGISTRY_NAMES = REPRESENTATIVE_DIVERGENCES

_FUNCTIONS = {"log": sp.log, "ln": sp.log, "exp": sp.exp, "sqrt": sp.sqrt, "Abs": sp.Abs, "abs": sp.Abs,
              "sign": sp.sign, "pi": sp.pi, "E": sp.E}
_PARAMETERS = {"alpha": ALPHA, "beta": BETA, "c": sp.Symbol("c", positive=True),
               "k": sp.Symbol("k", positive=True)}
_ALLOWED_CHARS = re.compile(r"^[0-9A-Za-z_ .+\-*/^()]*$")


def parse_f(text: str | sp.Expr) -> sp.Expr:
    """f(u) from a string like ``"u*log(u)"`` or ``"(sqrt(u) - 1)^2"`` (or a sympy expression, returned as is).

    Allowed names: u, the functions log/ln, exp, sqrt, Abs/abs, sign, the constants pi and E, and the
    parameters alpha, beta, c, k. ``^`` means power. Anything else raises a UserError naming what was wrong.
    """
    if isinstance(text, sp.Basic):
        return sp.sympify(text).subs(sp.Symbol("u"), U)
    if not isinstance(text, str):
        raise TypeError(f"f must be a string or a sympy expression, got {type(text).__name__}")
    if not text.strip():
        raise UserError("f is empty; type an expression in u, e.g. 'u*log(u)'")
    if not _ALLOWED_CHARS.match(text) or "__" in text or re.search(r"\.\s*[A-Za-z_]", text):
        raise UserError(f"f {text!r} has characters that are not allowed; use numbers, u, + - * / ^ ( ) "
                         f"and the names {', '.join(sorted(_FUNCTIONS) + sorted(_PARAMETERS))}")
    unknown = sorted(set(re.findall(r"[A-Za-z_]\w*", text)) - set(_FUNCTIONS) - set(_PARAMETERS) - {"u"})
    if unknown:
        raise UserError(f"f {text!r} uses unknown names {unknown}; allowed: u, "
                         f"{', '.join(sorted(_FUNCTIONS) + sorted(_PARAMETERS))}")
    names = dict(_FUNCTIONS, **_PARAMETERS, u=U)
    try:
        expr = parse_expr(text, local_dict=names, global_dict={"__builtins__": {}, **_sympy_core()},
                          transformations=standard_transformations + (convert_xor,))
    except Exception as exc:  # the parser raises SyntaxError, TokenError, TypeError, ... on malformed input
        raise UserError(f"could not read f {text!r} as an expression in u: {exc}") from None
    if not isinstance(expr, sp.Expr):
        raise UserError(f"f {text!r} is not an expression in u (got {type(expr).__name__})")
    return expr


def _sympy_core() -> dict:
    """The few sympy names the parser's generated code refers to (Integer, Float, Symbol, ...)."""
    return {name: getattr(sp, name) for name in ("Integer", "Float", "Rational", "Symbol", "Function")}


def _numeric(expr: sp.Expr, u: np.ndarray) -> np.ndarray:
    """``expr`` (in u only) evaluated on the array ``u``, broadcast to its shape."""
    with np.errstate(invalid="ignore", divide="ignore"):  # piecewise forms evaluate every branch
        values = sp.lambdify(U, expr, "numpy")(u)
    return np.asarray(values, dtype=float) * np.ones_like(u)


def check_f(f: sp.Expr, parameters: dict | None = None, log_u_range: float = 6.0, n_points: int = 400) -> None:
    """Raise a UserError unless f(1) = 0 and f is convex on u in [e^-range, e^range].

    f(1) = 0 is checked symbolically. Convexity is checked numerically (slopes between neighbouring grid
    points must not decrease), after substituting ``parameters``; it is skipped while symbols other than u
    remain (say which values to check with ``parameters``).
    """
    at_one = sp.simplify(f.subs(U, 1))
    if at_one != 0:
        raise UserError(f"f(1) must be 0 for an f-divergence (D_f(p||p) = 0), but f(1) = {at_one} for f = {f}; "
                         f"subtract it: f(u) - ({at_one})")
    concrete = f.subs(parameters or {})
    if concrete.free_symbols - {U}:
        return
    u = np.exp(np.linspace(-log_u_range, log_u_range, n_points))
    values = _numeric(concrete, u)
    if not np.all(np.isfinite(values)):
        raise UserError(f"f = {f} is not finite for every u > 0 (first bad u: {u[~np.isfinite(values)][0]:.3g})")
    slopes = np.diff(values) / np.diff(u)
    drop = np.diff(slopes)
    tolerance = 1e-7 * (1.0 + np.abs(slopes[1:]))
    if np.any(drop < -tolerance):
        at = u[1:-1][np.argmax(drop < -tolerance)]
        raise UserError(f"f = {f} is not convex: its slope decreases near u = {at:.3g}; an f-divergence needs "
                         "a convex f")


@dataclass(frozen=True)
class Derivation:
    """Everything the bias argument needs for one f, as sympy expressions in ``U``.

    Attributes:
        f: f(u).
        f_prime: f'(u).
        gradient_weight: ``f - u f'``, the exact per-sample weight of grad log pi_theta in grad D_f.
        opd_plus_advantage: ``w_f = -f + u f'`` (OPD+).
        opd_advantage: ``-f`` (stop-gradient OPD).
        stop_gradient_error: ``u f'``, what the stop-gradient drops.
        error_derivative: ``d/du (u f')``; identically 0 exactly when the error is a constant.
    """

    f: sp.Expr
    f_prime: sp.Expr
    gradient_weight: sp.Expr
    opd_plus_advantage: sp.Expr
    opd_advantage: sp.Expr
    stop_gradient_error: sp.Expr
    error_derivative: sp.Expr

    @property
    def error_is_constant(self) -> bool:
        """True when ``u f'(u)`` does not depend on u: the stop-gradient estimator is then unbiased."""
        return _is_constant_in_u(self.stop_gradient_error)


def _simplify(expr: sp.Expr) -> sp.Expr:
    return sp.simplify(sp.expand_log(expr, force=True))


def _is_constant_in_u(expr: sp.Expr) -> bool:
    """Symbolically when sympy can tell (no u left after simplifying), else numerically on a grid of u
    (and, for symbolic parameters, a few values of them)."""
    expr = sp.simplify(expr)
    if U not in expr.free_symbols:
        return True
    rest = expr.free_symbols - {U}
    if rest:
        return all(_is_constant_in_u(expr.subs({s: v for s in rest})) for v in (0.3, 0.7, 2.0))
    u = np.exp(np.linspace(-3, 3, 13)) * 1.01  # avoid landing exactly on a kink at u = 1
    values = _numeric(expr, u)
    return bool(np.allclose(values, values[0], rtol=1e-10, atol=1e-12))


@functools.lru_cache(maxsize=256)
def _derive(f: sp.Expr) -> Derivation:
    f_prime = _simplify(sp.diff(f, U))
    error = _simplify(U * f_prime)
    return Derivation(f=f, f_prime=f_prime, gradient_weight=_simplify(f - error),
                      opd_plus_advantage=_simplify(-f + error), opd_advantage=-f, stop_gradient_error=error,
                      error_derivative=_simplify(sp.diff(error, U)))


def derive(f: str | sp.Expr, check: bool = True, parameters: dict | None = None) -> Derivation:
    """Derive f', the gradient weight ``f - u f'``, ``w_f = -f + u f'`` and the error ``u f'`` for any f.

    ``f`` is a sympy expression in ``U`` or a string (see ``parse_f``). With ``check`` it must satisfy
    f(1) = 0 and be convex (``check_f``; ``parameters`` gives values for symbols other than u).

        >>> derive("u*log(u)").opd_plus_advantage
        u
    """
    f = parse_f(f)
    if check:
        check_f(f, parameters)
    return _derive(f)


def as_divergence(f: str | sp.Expr, name: str | None = None) -> Divergence:
    """A ``Divergence`` for any convex f with f(1) = 0 (checked), its f, f' and w_f derived by sympy and
    compiled to torch functions of log u, so every estimator (dense, full-vocabulary, ``opdlab.core.sparse``) takes
    it like a registry entry. It carries no perspective form, and its weight is marked unbounded."""
    derivation = derive(f)
    log_u = sp.Symbol("log_u", real=True)

    def compiled(expr):
        fn = sp.lambdify(log_u, expr.subs(U, sp.exp(log_u)), "torch")
        return lambda L: fn(L) + torch.zeros_like(L)  # a constant expression still gives a tensor of L's shape

    f_text, w_text = str(derivation.f), str(derivation.opd_plus_advantage)
    return Divergence(name or f_text, f_text, f_text, w_text,
                      compiled(derivation.f), compiled(derivation.f_prime), compiled(derivation.opd_plus_advantage),
                      bounded_weight=False)


def error_is_constant(f: str | sp.Expr) -> bool:
    """Whether the stop-gradient error ``u f'(u)`` of f is a constant (stop-gradient OPD unbiased)."""
    return derive(f, check=False).error_is_constant


def constant_error_solution() -> dict:
    """Solve ``d/du (u f'(u)) = 0`` for f with dsolve, then impose f(1) = 0 and convexity.

    Returns a dict of sympy objects: ``ode`` (the equation), ``general`` (C1 log u + C2), ``normalised``
    (with f(1) = 0: C1 log u), ``second_derivative`` (-C1 / u^2, so convex iff C1 <= 0), and ``f``
    (= -c log u with c = -C1 >= 0): the only f whose stop-gradient error is constant is a multiple of reverse KL.
    """
    fn = sp.Function("f")
    ode = sp.Eq(sp.diff(U * sp.diff(fn(U), U), U), 0)
    general = sp.dsolve(ode, fn(U)).rhs
    constants = sorted(general.free_symbols - {U}, key=lambda s: s.name)
    at_one = sp.solve(sp.Eq(general.subs(U, 1), 0), constants[0], dict=True)
    normalised = sp.simplify(general.subs(at_one[0])) if at_one else general
    (scale,) = normalised.free_symbols - {U}
    c = sp.Symbol("c", nonnegative=True)
    return dict(ode=ode, general=general, normalised=normalised,
                second_derivative=sp.simplify(sp.diff(normalised, U, 2)),
                f=sp.simplify(normalised.subs(scale, -c)))


def registry_expression(div: Divergence | str, symbolic_parameter: bool = False) -> sp.Expr:
    """f(u) as a sympy expression for a registry divergence, written exactly as the registry stores it.

    Families: ``gjsd:<beta>`` gives ``beta u log u - m log m``, m = beta u + 1 - beta; ``alpha:<a>`` gives
    ``(u^a - a u - (1 - a)) / (a (a - 1))`` (its limits at a = 0, 1). With ``symbolic_parameter`` the family
    parameter stays the symbol ``beta`` or ``alpha``.
    """
    div = get(div)
    u = U
    fixed = {
        "reverse_kl": -sp.log(u),
        "forward_kl": u * sp.log(u),
        "jsd": sp.Rational(1, 2) * (u * sp.log(u) - (1 + u) * sp.log((1 + u) / 2)),
        "tv": sp.Abs(u - 1) / 2,
        "hellinger": (sp.sqrt(u) - 1) ** 2,
        "pearson_chi2": (u - 1) ** 2,
        "neyman_chi2": (1 - u) ** 2 / u,
    }
    if div.name in fixed:
        return fixed[div.name]
    family = div.name.split(":")[0]
    value = sp.nsimplify(div.parameter)
    if family == "gjsd":
        b = BETA if symbolic_parameter else value
        m = b * u + 1 - b
        return b * u * sp.log(u) - m * sp.log(m)
    a = ALPHA if symbolic_parameter else value
    if not symbolic_parameter and a in (0, 1):
        return u - 1 - sp.log(u) if a == 0 else u * sp.log(u) - u + 1
    return (u ** a - a * u - (1 - a)) / (a * (a - 1))


def advantage_table(names=REGISTRY_NAMES) -> pd.DataFrame:
    """One row per divergence: f, f', the gradient weight f - u f', the OPD+ advantage w_f, the
    stop-gradient error u f', whether that error is constant; as text and LaTeX."""
    rows = []
    for name in names:
        div = get(name)
        d = derive(registry_expression(div))
        rows.append(dict(divergence=div.name, label=div.label, f=str(d.f), f_prime=str(d.f_prime),
                         gradient_weight=str(d.gradient_weight), opd_plus_advantage=str(d.opd_plus_advantage),
                         stop_gradient_error=str(d.stop_gradient_error), error_is_constant=d.error_is_constant,
                         f_latex=sp.latex(d.f), w_latex=sp.latex(d.opd_plus_advantage)))
    return pd.DataFrame(rows)


def advantage_curves(names=REGISTRY_NAMES, log_u_min: float = -3.0, log_u_max: float = 3.0,
                     n_points: int = 121) -> pd.DataFrame:
    """Tidy curves of the two advantages over log u, from the sympy derivation and checked against the
    registry: columns divergence, label, log_u, u, opd (-f), opd_plus (w_f), error (u f')."""
    import torch

    if not (log_u_min < log_u_max and n_points >= 2):
        raise UserError(f"need log_u_min < log_u_max and n_points >= 2, got {log_u_min}, {log_u_max}, {n_points}")
    log_u = np.linspace(log_u_min, log_u_max, n_points)
    frames = []
    for name in names:
        div = get(name)
        d = derive(registry_expression(div), check=False)
        w = _numeric(d.opd_plus_advantage, np.exp(log_u))
        w_registry = div.opd_plus_advantage(torch.as_tensor(log_u, dtype=torch.float64)).numpy()
        if not np.allclose(w, w_registry, rtol=1e-9, atol=1e-9):
            raise AssertionError(f"sympy's w_f and the registry's disagree for {div.name}")
        opd = div.opd_advantage(torch.as_tensor(log_u, dtype=torch.float64)).numpy()
        frames.append(pd.DataFrame(dict(divergence=div.name, label=div.label, log_u=log_u, u=np.exp(log_u),
                                        opd=opd, opd_plus=w, error=w - opd)))
    return pd.concat(frames, ignore_index=True)
