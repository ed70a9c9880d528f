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

On the exact toys of ``opdlab.exact.toy`` every sequence y can be enumerated, so the audit computes the per-sample
gradient g(y) = grad_theta L(y) (autograd with the sample held fixed, as a framework's backward pass does), its
exact mean E[g] = sum_y P_theta(y) g(y) and per-sample variance tr Cov(g), and compares E[g] with the exact
gradient of every registry divergence, and of the non-f targets an estimator names (``opdlab.audit.types``:
a density-power divergence, the student's low-probability mass): token-local (prefix probabilities held fixed,
the gamma = 0 target) and, on sequence toys, sequence-level (grad of E[sum_t f(u_t)]). On a categorical toy (one
context) the two coincide and only "token_local" is reported.

An estimator may carry a hand derivation ``follows = {target: c, ...}``: the claim E[g] = sum_d c_d grad D_d at
its ``scope``; the audit reports how far the enumeration is from it (``hand_error``). An exception raised inside
an audited function becomes an ``EstimatorFunctionError`` (a ``UserError``) naming the function, the exception
type and the line of the function's file; the original exception, with its traceback, is its ``__cause__``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from opdlab.audit.catalogue import CATALOGUE
from opdlab.audit.types import (ARGUMENTS, DIVERGENCES, KINDS, MODES, TARGETS, Estimator, Objective, Source, Term,
                                arguments, target)
from opdlab.errors import UserError
from opdlab.exact.toy import (CategoricalToy, SequenceToy, exact_gradient, exact_sequence_gradient, make_categorical,
                              make_sequence, prefix_log_probs, sequence_log_probs, token_local_gradient)

__all__ = ["MODES", "ARGUMENTS", "KINDS", "TARGETS", "DIVERGENCES", "Source", "Term", "Estimator", "estimator",
           "catalogue", "get_estimator", "load_function", "expected_gradient", "audit", "cosine_summary", "verdicts",
           "format_verdicts", "EstimatorFunctionError"]

DTYPE = torch.float64
ZERO_TOL = 1e-9  # E[g] counts as zero when ||E[g]|| <= ZERO_TOL * sqrt(E||g||^2)


class EstimatorFunctionError(UserError):
    """An exception raised inside the audited function: said in one line (the function, the exception type, the
    line of the function's file it came from); the original exception is ``__cause__``, with its traceback."""


def estimator(fn: Callable, mode: str, name: str | None = None, claims: str | None = None,
              scope: str = "token_local", follows: dict[str, float] | None = None) -> Estimator:
    """An ``Estimator`` of one function: ``fn`` returns per-token values, ``mode`` is one of ``MODES``."""
    if not callable(fn):
        raise UserError(f"an estimator is a function of {', '.join(ARGUMENTS)}; got {type(fn).__name__}")
    return Estimator(name or getattr(fn, "__name__", "estimator"), (Term(fn, mode),), claims, scope, follows,
                     inspect.getdoc(fn) or "")


def catalogue() -> dict[str, Estimator]:
    """The estimators the field uses, by name (``opdlab.audit.catalogue``), then OPD and OPD+ references."""
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
        try:
            loaded.loader.exec_module(module)
        except Exception as err:  # the user's file: one line, the traceback kept as __cause__
            raise EstimatorFunctionError(f"loading {path} raised {type(err).__name__}: {err} (at "
                                         f"{_where_file(str(path.resolve()), err)})") from err
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"cannot import module {module_name!r} of {spec!r}: {err}") from None
        except Exception as err:  # the user's module failed while importing: one line, traceback as __cause__
            raise EstimatorFunctionError(f"importing {module_name} raised {type(err).__name__}: {err} (at "
                                         f"{_where_file(None, err)})") from err
    if not hasattr(module, attr):
        raise UserError(f"module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    arguments(fn)
    return fn


# ---------------------------------------------------------------------------------------------------------
# Enumeration and per-sample gradients.


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
    raise TypeError(f"a toy is an opdlab.exact.toy.CategoricalToy or SequenceToy, got {type(toy).__name__}")


def _where_file(home: str | None, err: BaseException) -> str:
    """``file:line`` of the deepest frame of ``err`` in the file ``home`` (else the deepest frame at all; for a
    SyntaxError, where it points)."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if f.filename == home] or frames[-1:]
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else "unknown line"


def _where(fn: Callable, err: BaseException) -> str:
    """``file:line`` of the deepest frame of ``err`` inside ``fn``'s file."""
    fn = fn.func if isinstance(fn, functools.partial) else fn
    return _where_file(getattr(getattr(inspect.unwrap(fn), "__code__", None), "co_filename", None), err)


def _call(term: Term, inputs: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    label = getattr(term.fn, "__name__", name)
    try:
        return term.fn(**{k: inputs[k] for k in arguments(term.fn)})
    except Exception as err:  # the user's code: reported in one line, the traceback kept as __cause__
        raise EstimatorFunctionError(f"estimator {name!r}: {label} raised {type(err).__name__}: {err} (at "
                                     f"{_where(term.fn, err)}; --traceback shows where)") from err


def _values(term: Term, inputs: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    v = _call(term, inputs, name)
    label = getattr(term.fn, "__name__", name)
    shape = tuple(inputs["logp_student_BT"].shape)
    if not isinstance(v, torch.Tensor):
        raise UserError(f"estimator {name!r}: {label} returned {type(v).__name__}; it must return a tensor of "
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


def _objective_gradient(objective: Objective, toy, scope: str) -> torch.Tensor:
    """``grad sum_c P(c) D(c)`` for a non-f target, by autograd (P held fixed for the token-local gradient)."""
    if isinstance(toy, CategoricalToy):
        theta = toy.logits_student_K.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective.exact(toy.logp_teacher_K, torch.log_softmax(theta, -1)), theta)
        return grad
    theta = toy.logits_student_NV.detach().clone().requires_grad_(True)
    logp_NV = torch.log_softmax(theta, -1)
    P_N = prefix_log_probs(logp_NV, toy).exp()
    P_N = P_N.detach() if scope == "token_local" else P_N
    (grad,) = torch.autograd.grad((P_N * objective.exact(toy.logp_teacher_NV, logp_NV)).sum(), theta)
    return grad.reshape(-1)


def _exact(name: str, toy, scope: str) -> torch.Tensor:
    """The exact gradient of target ``name`` (a registry divergence or an ``Objective``) on ``toy``."""
    t = target(name)
    if isinstance(t, Objective):
        return _objective_gradient(t, toy, scope)
    if isinstance(toy, CategoricalToy):
        return exact_gradient(t.name, toy)
    return (token_local_gradient if scope == "token_local" else exact_sequence_gradient)(t.name, toy)


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
            raise UserError(f"audit takes Estimators or catalogue names (wrap a function with "
                            f"opdlab.audit.expected.estimator(fn, mode)), got {type(e).__name__}")
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
    added to them, and a non-f target it follows (``dpd:ALPHA``, ``low_mass:FRAC``) is compared for it alone.
    """
    ests = _as_estimators(estimators)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    names = list(dict.fromkeys([target(d).name for d in divergences] +
                               [target(e.claims).name for e in ests if e.claims]))
    # a non-f target an estimator follows is compared with that estimator only
    own = {e.name: [n for n in dict.fromkeys(target(d).name for d in e.follows or {})
                    if n not in names and isinstance(target(n), Objective)] for e in ests}
    rows = []
    for kind in kinds:
        targets = ("token_local",) if kind == "categorical" else TARGETS
        for toy_seed, toy in _toys(kind, n_toys, seed, n_tokens, vocab_size, horizon, temperature):
            shared = {(d, t): _exact(d, toy, t) for d in names for t in targets}
            for est in ests:
                exact = {**shared, **{(d, t): _exact(d, toy, t) for d in own[est.name] for t in targets}}
                g_SD, P_S = per_sample_gradients(est, toy)
                mean_D, variance = _moments(g_SD, P_S)
                rms = math.sqrt(float(P_S @ g_SD.pow(2).sum(-1)))
                scope = est.scope if kind == "sequence" else "token_local"
                hand = float("nan")
                if est.follows is not None:
                    h = sum((c * _exact(d, toy, scope) for d, c in est.follows.items()),
                            torch.zeros_like(mean_D))
                    hand = float((mean_D - h).norm()) / max(float(h.norm()), rms, 1e-300)
                common = dict(kind=kind, toy_seed=toy_seed, estimator=est.name, mode=est.mode,
                              claims=target(est.claims).name if est.claims else "", scope=est.scope,
                              variance=variance, mean_norm=float(mean_D.norm()), rms_norm=rms, hand_error=hand)
                zero = float(mean_D.norm()) <= ZERO_TOL * rms
                for (d, t), grad in exact.items():
                    flat = float(grad @ grad) == 0.0  # a target without gradient on this toy (an empty S)
                    rows.append(dict(common, divergence=d, target=t,
                                     cosine=float("nan") if zero else _cosine(mean_D, grad),
                                     relative_error=float("nan") if flat else
                                     float((mean_D - grad).norm() / grad.norm()),
                                     scale=float("nan") if flat else float(mean_D @ grad) / float(grad @ grad)))
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
            closest="nothing (E[g] = 0)" if zero else _label(best[0], best[1] == "sequence" and kind == "sequence"),
            closest_cosine=float("nan") if zero else float(means.cosine[best]),
            closest_scale=float("nan") if zero else float(means.scale[best]),
            variance=float(d.groupby("toy_seed").variance.first().mean()),
            hand_error=float(d.hand_error.max()) if d.hand_error.notna().any() else float("nan")))
    return pd.DataFrame(rows)


def _label(name: str, sequence: bool) -> str:
    """A verdict's words: the registry name, or what a non-f objective does; "(sequence)" for the sequence one."""
    t = target(name)
    return (t.label if isinstance(t, Objective) else t.name) + (" (sequence)" if sequence else "")


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
