"""The estimator audit: what does a per-token distillation loss really optimise?

An estimator is written the way training code writes it: a function of the sampled tokens' log-probabilities
(and, where it uses them, the full distributions at those contexts) returning one value per token, plus how its
gradient is taken. The function receives, by parameter name, any of

    logp_student_BT    log pi_theta(y_t | c_t) of the sampled tokens, shape (B, T), differentiable
    logp_teacher_BT    log pi_T(y_t | c_t), shape (B, T), a constant
    logp_student_BTV   log pi_theta(. | c_t) over the vocabulary, shape (B, T, V), differentiable
    logp_teacher_BTV   log pi_T(. | c_t), shape (B, T, V), a constant

and returns a (B, T) tensor v. The gradient modes (per sequence, minimised; pi = pi_theta(y_t | c_t)):

    "backprop"          L = sum_t v_t                        v is differentiated through the student
    "policy_gradient"   L = -sum_t sg(v_t) log pi            v is a detached advantage
    "importance_ratio"  L = -sum_t (pi / sg(pi)) v_t         the PPO/GRPO form at theta = theta_old; v keeps
                                                             whatever gradient the function leaves on it

On the exact toys of ``opdlab.toy`` every sequence y can be enumerated, so the audit computes the per-sample
gradient g(y) = grad_theta L(y) (autograd with the sample held fixed, as a framework's backward pass does), its
exact mean E[g] = sum_y P_theta(y) g(y) and per-sample variance tr Cov(g), and compares E[g] with the exact
gradient of every registry divergence: token-local (prefix probabilities held fixed, the gamma = 0 target)
and, on sequence toys, sequence-level (grad of E[sum_t f(u_t)]). On a categorical toy (one context) the two
coincide and only "token_local" is reported.

An estimator may carry a hand derivation ``follows = {divergence: c, ...}``: the claim
E[g] = sum_d c_d grad D_d at its ``scope``; the audit reports how far the enumeration is from it (``hand_error``).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd
import torch

from opdlab.divergences import get
from opdlab.toy import (CategoricalToy, SequenceToy, exact_gradient, exact_sequence_gradient, make_categorical,
                        make_sequence, sequence_log_probs, token_local_gradient)
from opdlab.errors import UserError

__all__ = ["MODES", "ARGUMENTS", "KINDS", "TARGETS", "DIVERGENCES", "Term", "Estimator", "estimator",
           "catalogue", "get_estimator", "load_function", "expected_gradient", "audit", "cosine_summary", "verdicts",
           "format_verdicts"]

MODES = ("backprop", "policy_gradient", "importance_ratio")
ARGUMENTS = ("logp_student_BT", "logp_teacher_BT", "logp_student_BTV", "logp_teacher_BTV")
KINDS = ("categorical", "sequence")
TARGETS = ("token_local", "sequence")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "pearson_chi2", "neyman_chi2", "gjsd:0.1",
               "alpha:0.5")
DTYPE = torch.float64
ZERO_TOL = 1e-9  # E[g] counts as zero when ||E[g]|| <= ZERO_TOL * sqrt(E||g||^2)


@dataclass(frozen=True)
class Term:
    """One per-token function and the way its gradient is taken (one of ``MODES``)."""

    fn: Callable
    mode: str

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown gradient mode {self.mode!r}; allowed: {', '.join(MODES)} (backprop: the "
                             "value is differentiated directly; policy_gradient: a detached advantage times "
                             "grad log pi; importance_ratio: pi/sg(pi) times the value)")
        _arguments(self.fn)


@dataclass(frozen=True)
class Estimator:
    """A per-token estimator: its terms (summed), what it claims, and the hand derivation of what it follows.

    Attributes:
        name: short identifier, e.g. ``"k3_backprop"``.
        terms: the (function, gradient mode) pairs whose surrogate losses are added.
        claims: the registry divergence it is meant to minimise, or None (a control).
        scope: ``"token_local"`` or ``"sequence"``: which exact gradient ``claims`` and ``follows`` refer to.
        follows: hand derivation ``{divergence: c}`` meaning E[g] = sum c grad D (``{}``: E[g] = 0), or None.
        doc: what it does and where it comes from (repository and file, or paper).
    """

    name: str
    terms: tuple[Term, ...]
    claims: str | None = None
    scope: str = "token_local"
    follows: dict[str, float] | None = None
    doc: str = ""

    def __post_init__(self):
        if not self.terms:
            raise UserError(f"estimator {self.name!r} has no terms")
        if self.scope not in TARGETS:
            raise UserError(f"scope of {self.name!r} must be one of {', '.join(TARGETS)}, got {self.scope!r}")
        for name in ([self.claims] if self.claims else []) + list(self.follows or {}):
            get(name)  # a clear error for an unknown divergence

    @property
    def mode(self) -> str:
        """The gradient modes of its terms, joined with '+'."""
        return "+".join(t.mode for t in self.terms)


def estimator(fn: Callable, mode: str, name: str | None = None, claims: str | None = None,
              scope: str = "token_local", follows: dict[str, float] | None = None) -> Estimator:
    """An ``Estimator`` of one function: ``fn`` returns per-token values, ``mode`` is one of ``MODES``."""
    if not callable(fn):
        raise TypeError(f"an estimator is a function of {', '.join(ARGUMENTS)}; got {type(fn).__name__}")
    return Estimator(name or getattr(fn, "__name__", "estimator"), (Term(fn, mode),), claims, scope, follows,
                     inspect.getdoc(fn) or "")


def catalogue() -> dict[str, Estimator]:
    """The estimators the field uses, by name (``opdlab.audit_catalogue``), then OPD and OPD+ references."""
    from opdlab.audit_catalogue import CATALOGUE

    return dict(CATALOGUE)


def get_estimator(name: str) -> Estimator:
    """A catalogue entry by name; an unknown name lists the known ones."""
    entries = catalogue()
    if name not in entries:
        raise UserError(f"unknown catalogue estimator {name!r}; known: {', '.join(entries)}")
    return entries[name]


def load_function(spec: str) -> Callable:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"give the function as MODULE:FUNCTION (e.g. mypkg.losses:my_kl or losses.py:my_kl), "
                         f"got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"cannot import module {module_name!r} of {spec!r}: {err}") from None
    if not hasattr(module, attr):
        raise UserError(f"module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    _arguments(fn)
    return fn


# ---------------------------------------------------------------------------------------------------------
# Enumeration and per-sample gradients.


def _arguments(fn: Callable) -> tuple[str, ...]:
    """The ``ARGUMENTS`` that ``fn`` takes, or a TypeError naming the parameter that is not one of them."""
    label = getattr(fn, "__name__", repr(fn))
    if not callable(fn):
        raise TypeError(f"estimator function must be callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise TypeError(f"cannot read the signature of {label}; write it as a def with named parameters "
                        f"from: {', '.join(ARGUMENTS)}") from None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ARGUMENTS
    names = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL,):
            continue
        if p.name in ARGUMENTS:
            names.append(p.name)
        elif p.default is p.empty:
            raise TypeError(f"estimator function {label} has parameter {p.name!r}, which the audit cannot "
                            f"supply; allowed parameter names: {', '.join(ARGUMENTS)} (others need defaults)")
    if not names:
        raise TypeError(f"estimator function {label} takes none of {', '.join(ARGUMENTS)}; it must read at "
                        "least the student's log-probabilities")
    return tuple(names)


@dataclass(frozen=True)
class _Enumeration:
    """Every outcome of a toy: the sequences' tokens and context nodes, and their probabilities."""

    kind: str
    logits_NV: torch.Tensor
    logp_teacher_NV: torch.Tensor
    tokens_SH: torch.Tensor
    nodes_SH: torch.Tensor
    P_S: torch.Tensor
    toy: CategoricalToy | SequenceToy = field(repr=False)


def _enumerate(toy: CategoricalToy | SequenceToy) -> _Enumeration:
    if isinstance(toy, CategoricalToy):
        K = toy.n_tokens
        return _Enumeration("categorical", toy.logits_student_K[None].to(DTYPE), toy.logp_teacher_K[None].to(DTYPE),
                            torch.arange(K)[:, None], torch.zeros(K, 1, dtype=torch.long),
                            toy.logp_student_K.detach().exp(), toy)
    if isinstance(toy, SequenceToy):
        tokens_SH, nodes_SH = toy.tree[:2]
        return _Enumeration("sequence", toy.logits_student_NV.to(DTYPE), toy.logp_teacher_NV.to(DTYPE), tokens_SH,
                            nodes_SH, sequence_log_probs(toy).exp(), toy)
    raise TypeError(f"a toy is an opdlab.toy.CategoricalToy or SequenceToy, got {type(toy).__name__}")


def _values(term: Term, inputs: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    wanted = _arguments(term.fn)
    v = term.fn(**{k: inputs[k] for k in wanted})
    label = getattr(term.fn, "__name__", name)
    shape = tuple(inputs["logp_student_BT"].shape)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"estimator {name!r}: {label} returned {type(v).__name__}; it must return a tensor of "
                        f"per-token values with shape (B, T) = {shape}")
    if tuple(v.shape) != shape:
        raise UserError(f"estimator {name!r}: {label} returned shape {tuple(v.shape)}; expected one value per "
                         f"token, (B, T) = {shape}")
    bad = ~torch.isfinite(v.detach())
    if bool(bad.any()):
        raise UserError(f"estimator {name!r}: {label} returned {int(bad.sum())} non-finite values (NaN or inf) "
                         f"out of {v.numel()}; it must be finite wherever the student's and teacher's "
                         "log-probabilities are (check divisions, logs of 0, exp overflow)")
    return v.to(DTYPE)


def _surrogate(term: Term, v_ST: torch.Tensor, logp_ST: torch.Tensor) -> torch.Tensor:
    """Per-sequence surrogate loss of one term (see the module docstring)."""
    if term.mode == "backprop":
        return v_ST.sum(-1)
    if term.mode == "policy_gradient":
        return -(v_ST.detach() * logp_ST).sum(-1)
    return -(torch.exp(logp_ST - logp_ST.detach()) * v_ST).sum(-1)


def per_sample_gradients(est: Estimator, toy: CategoricalToy | SequenceToy) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_SD, P_S)``: the gradient w.r.t. the flattened student logits of every enumerated outcome's surrogate
    loss, and each outcome's probability under the student. One backward pass: each outcome gets its own copy
    of the logits, so the gradient of the summed losses holds every per-sample gradient."""
    e = _enumerate(toy)
    S = e.P_S.shape[0]
    theta_SNV = e.logits_NV.detach().expand(S, *e.logits_NV.shape).clone().requires_grad_(True)
    logp_SNV = torch.log_softmax(theta_SNV, -1)
    s = torch.arange(S)[:, None]
    inputs = dict(logp_student_BT=logp_SNV[s, e.nodes_SH, e.tokens_SH], logp_student_BTV=logp_SNV[s, e.nodes_SH],
                  logp_teacher_BT=e.logp_teacher_NV[e.nodes_SH, e.tokens_SH],
                  logp_teacher_BTV=e.logp_teacher_NV[e.nodes_SH])
    loss_S = sum(_surrogate(t, _values(t, inputs, est.name), inputs["logp_student_BT"]) for t in est.terms)
    if not loss_S.requires_grad:
        return torch.zeros(S, theta_SNV[0].numel(), dtype=DTYPE), e.P_S
    (grad_SNV,) = torch.autograd.grad(loss_S.sum(), theta_SNV, allow_unused=True)
    if grad_SNV is None:
        grad_SNV = torch.zeros_like(theta_SNV)
    if not bool(torch.isfinite(grad_SNV).all()):
        raise UserError(f"estimator {est.name!r} has a non-finite gradient on this toy (its value is finite, its "
                         "derivative is not: e.g. sqrt or abs at 0, a clamp edge)")
    return grad_SNV.reshape(S, -1), e.P_S


def _moments(g_SD: torch.Tensor, P_S: torch.Tensor) -> tuple[torch.Tensor, float]:
    mean_D = P_S @ g_SD
    return mean_D, float(P_S @ (g_SD - mean_D).pow(2).sum(-1))


def expected_gradient(est: Estimator, toy: CategoricalToy | SequenceToy) -> tuple[torch.Tensor, float]:
    """Exact ``E[g] = sum_y P_theta(y) g(y)`` (flattened like the toy's logits) and ``tr Cov(g)``."""
    return _moments(*per_sample_gradients(est, toy))


def _exact(name: str, toy, target: str) -> torch.Tensor:
    if isinstance(toy, CategoricalToy):
        return exact_gradient(name, toy)
    return (token_local_gradient if target == "token_local" else exact_sequence_gradient)(name, toy)


# ---------------------------------------------------------------------------------------------------------
# The audit over many toys, and its verdicts.


def _toys(kind: str, n_toys: int, seed: int, n_tokens: int, vocab_size: int, horizon: int, temperature: float):
    if kind not in KINDS:
        raise UserError(f"unknown toy kind {kind!r}; allowed: {', '.join(KINDS)}")
    if isinstance(n_toys, bool) or not isinstance(n_toys, int) or n_toys < 1:
        raise UserError(f"n_toys must be an integer >= 1, got {n_toys!r}")
    for s in range(seed, seed + n_toys):
        yield s, (make_categorical(n_tokens, s, temperature) if kind == "categorical"
                  else make_sequence(vocab_size, horizon, s, temperature))


def _as_estimators(estimators) -> list[Estimator]:
    if estimators is None:
        return list(catalogue().values())
    if isinstance(estimators, (Estimator, str)) or callable(estimators):
        estimators = [estimators]
    out = []
    for e in estimators:
        if isinstance(e, str):
            e = get_estimator(e)
        elif not isinstance(e, Estimator):
            raise TypeError(f"audit takes Estimators or catalogue names (wrap a function with "
                            f"opdlab.audit.estimator(fn, mode)), got {type(e).__name__}")
        out.append(e)
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def audit(estimators=None, kinds: str | Sequence[str] = KINDS, n_toys: int = 50, seed: int = 0,
          divergences: Sequence[str] = DIVERGENCES, n_tokens: int = 8, vocab_size: int = 3, horizon: int = 3,
          temperature: float = 1.0) -> pd.DataFrame:
    """Audit ``estimators`` (Estimators or catalogue names; None: the whole catalogue) on random toys, exactly.

    One row per kind x toy x estimator x divergence x target, with columns kind, toy_seed, estimator, mode,
    claims, scope, divergence, target, cosine (of E[g] to grad D), relative_error (``||E[g] - grad D|| /
    ||grad D||``), scale (``<E[g], grad D> / ||grad D||^2``: the step size E[g] takes along grad D), variance
    (per-sample tr Cov(g)), mean_norm (``||E[g]||``), rms_norm (``sqrt(E||g||^2)``) and hand_error
    (``||E[g] - sum_d c_d grad D_d|| / max(||sum_d c_d grad D_d||, rms_norm)`` for the estimator's hand
    derivation; NaN where it has none). ``divergences`` are compared; a divergence an estimator claims is
    added to them.
    """
    ests = _as_estimators(estimators)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    names = list(dict.fromkeys([get(d).name for d in divergences] +
                               [get(e.claims).name for e in ests if e.claims]))
    rows = []
    for kind in kinds:
        targets = ("token_local",) if kind == "categorical" else TARGETS
        for toy_seed, toy in _toys(kind, n_toys, seed, n_tokens, vocab_size, horizon, temperature):
            exact = {(d, t): _exact(d, toy, t) for d in names for t in targets}
            for est in ests:
                g_SD, P_S = per_sample_gradients(est, toy)
                mean_D, variance = _moments(g_SD, P_S)
                rms = math.sqrt(float(P_S @ g_SD.pow(2).sum(-1)))
                scope = est.scope if kind == "sequence" else "token_local"
                hand = float("nan")
                if est.follows is not None:
                    h = sum((c * _exact(get(d).name, toy, scope) for d, c in est.follows.items()),
                            torch.zeros_like(mean_D))
                    hand = float((mean_D - h).norm()) / max(float(h.norm()), rms, 1e-300)
                common = dict(kind=kind, toy_seed=toy_seed, estimator=est.name, mode=est.mode,
                              claims=get(est.claims).name if est.claims else "", scope=est.scope,
                              variance=variance, mean_norm=float(mean_D.norm()), rms_norm=rms, hand_error=hand)
                zero = float(mean_D.norm()) <= ZERO_TOL * rms
                for (d, t), grad in exact.items():
                    rows.append(dict(common, divergence=d, target=t,
                                     cosine=float("nan") if zero else _cosine(mean_D, grad),
                                     relative_error=float((mean_D - grad).norm() / grad.norm()),
                                     scale=float(mean_D @ grad) / float(grad @ grad)))
    cols = ["kind", "toy_seed", "estimator", "mode", "claims", "scope", "divergence", "target", "cosine",
            "relative_error", "scale", "variance", "mean_norm", "rms_norm", "hand_error"]
    return pd.DataFrame(rows)[cols]


def cosine_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """An ``audit`` frame summarised over toys: per kind x estimator x divergence x target, the mean, min and
    max cosine, and the mean relative error and scale (what the heatmap of notebook 07 draws)."""
    keys = ["kind", "estimator", "mode", "claims", "divergence", "target"]
    g = frame.groupby(keys, sort=False)
    out = g.cosine.agg(cosine="mean", cosine_min="min", cosine_max="max")
    out[["relative_error", "scale"]] = g[["relative_error", "scale"]].mean()
    out["n_toys"] = g.toy_seed.nunique()
    return out.reset_index()


def verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per kind x estimator from an ``audit`` frame: cosine to reverse and forward KL and to the claimed
    divergence (at the estimator's scope; token-local on categorical toys), its relative error there, the
    divergence x target it is closest to (highest mean cosine; "nothing" when E[g] is zero), variance, and the
    largest hand-derivation error over the toys."""
    rows = []
    for (kind, name), d in frame.groupby(["kind", "estimator"], sort=False):
        first = d.iloc[0]
        scope = first.scope if kind == "sequence" else "token_local"
        at = d[d.target == scope].groupby("divergence", sort=False)[["cosine", "relative_error", "scale"]].mean()
        means = d.groupby(["divergence", "target"], sort=False)[["cosine", "scale"]].mean()
        zero = bool((d.mean_norm <= ZERO_TOL * d.rms_norm).all())
        claimed = first.claims
        best = None if zero else means.cosine.idxmax()
        if best is not None and claimed and (claimed, scope) in means.index \
                and means.cosine[(claimed, scope)] >= means.cosine[best] - 1e-9:
            best = (claimed, scope)  # a tie (alpha:0.5 is twice hellinger): the claimed divergence
        rows.append(dict(
            kind=kind, estimator=name, mode=first["mode"], claims=claimed or "-", scope=scope,
            cos_reverse_kl=at.cosine.get("reverse_kl", float("nan")),
            cos_forward_kl=at.cosine.get("forward_kl", float("nan")),
            cos_claimed=at.cosine.get(claimed, float("nan")) if claimed else float("nan"),
            rel_error_claimed=at.relative_error.get(claimed, float("nan")) if claimed else float("nan"),
            closest="nothing (E[g] = 0)" if zero else (best[0] if best[1] == "token_local" or kind == "categorical"
                                                        else f"{best[0]} (sequence)"),
            closest_cosine=float("nan") if zero else float(means.cosine[best]),
            closest_scale=float("nan") if zero else float(means.scale[best]),
            variance=float(d.groupby("toy_seed").variance.first().mean()),
            hand_error=float(d.hand_error.max()) if d.hand_error.notna().any() else float("nan")))
    return pd.DataFrame(rows)


def format_verdicts(table: pd.DataFrame) -> str:
    """``verdicts`` as a fixed-width text table (what ``opdlab audit`` prints)."""
    header = (f"{'estimator':<30} {'mode':<28} {'claims':<11} {'cos RKL':>7} {'cos FKL':>7} {'cos claim':>9} "
              f"{'rel err':>8} {'variance':>9} {'hand err':>8}  closest")
    lines = []
    for kind, t in table.groupby("kind", sort=False):
        lines += [f"[{kind} toys]", header]
        for r in t.itertuples():
            lines.append(f"{r.estimator:<30} {r.mode:<28} {r.claims:<11} {r.cos_reverse_kl:7.3f} "
                         f"{r.cos_forward_kl:7.3f} {r.cos_claimed:9.3f} {r.rel_error_claimed:8.3f} "
                         f"{r.variance:9.3g} {r.hand_error:8.1e}  {r.closest}"
                         + ("" if math.isnan(r.closest_cosine) else
                            f" (cos {r.closest_cosine:.3f}, scale {r.closest_scale:.3g})"))
    return "\n".join(lines)
