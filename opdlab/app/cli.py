"""Command line: ``opdlab <command>`` (or ``python -m opdlab``).

    opdlab toy [-d DIVERGENCE ...] [--seed S] [--n-toys N] [--teacher-topk K] [--csv PATH]
                                         cos(E[g], grad D_f) of OPD and OPD+ on random categorical toys, exact;
                                         with K > 0, OPD+ from a top-K teacher (opdlab.exact.topk_toy.topk_table)
    opdlab divergences                   the registry: f, OPD+ advantage, bounded or not
    opdlab train RUN_DIR [-p FIELD VALUE ...]
                                         one OPD/OPD+ run (RunSpec and Runtime fields, -p preset NAME),
                                         resumable; data-parallel
                                         under torchrun --nproc_per_node N -m opdlab train ...
    opdlab eval MODEL_DIR --task NAME [-n N] [--samples K] [--seed S] [--device D] [--csv PATH]
                                         held-out greedy accuracy, avg@K (temperature 1), malformed rate,
                                         call accuracy of a local checkpoint (or a run directory's)
    opdlab notebooks [NAME ...] [-p KEY VALUE ...]
                                         execute notebooks with papermill (all by default)
    opdlab report [--check] [--root DIR]
                                         regenerate docs/results.md and the README's marked tables from
                                         figures/data; --check exits 1 naming what differs
    opdlab audit [ESTIMATOR ...] [--function MODULE:FUNCTION --mode MODE [--claims DIVERGENCE]] [--list]
                 [--traceback]           what a per-token estimator's expected gradient follows, exactly on toys;
                                         an exception in --function is one line (function, type, file:line)

Each command is a thin wrapper: ``toy`` over ``opdlab.experiments.montecarlo.estimator_cosines`` (notebook 02's
cosines), ``train`` over ``opdlab.training.loop.train``, ``eval`` over ``lm.modeling.load_model``,
``lm.sampling.sampled_accuracy`` and ``tasks.score_batch`` / ``summarize``.
Bad input (an unknown divergence or task, a missing or damaged checkpoint, a tokenizer that cannot write the
task, a run directory in use or holding another run, a disk that is full or read-only) prints one line
``opdlab <command>: error: ...`` saying what is wrong and what is allowed, and exits with status 2. Ctrl-C
stops with ``opdlab <command>: interrupted`` (for ``train``: how to resume) and status 130.
``opdlab train RUN_DIR`` on a directory that holds a run resumes it with its recorded config.
"""
from __future__ import annotations

import argparse
import ast
import errno
import sys
from pathlib import Path

from opdlab.errors import UserError
from opdlab.rundir import layout

__all__ = ["main", "build_parser"]


def _literal(text: str):
    """A parameter value as a Python literal when it is one (3, 0.5, [1, 2], True), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _write_csv(frame, path: str) -> None:
    """Write a tidy DataFrame to ``path`` (parent directories created; a full disk names the path) and say so."""
    from opdlab.files import disk_errors

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with disk_errors(path):
        frame.to_csv(path, index=False)
    print(f"wrote {len(frame)} rows to {path}")


def _cmd_notebooks(args) -> int:
    from opdlab.app.notebooks import execute_notebook, list_notebooks

    names = args.names or [p.stem for p in list_notebooks()]
    parameters = {key: _literal(value) for key, value in args.parameter}
    if args.figures_dir:
        parameters["figures_dir"] = args.figures_dir
    for name in names:
        execute_notebook(name, parameters, output_dir=args.output_dir, progress=not args.quiet)
    return 0


def _cmd_divergences(args) -> int:
    from opdlab.core.divergences import get, names

    rows = [get(n) for n in names() if ":" not in n] + [get("gjsd:0.1"), get("alpha:0.5")]
    width = max(len(d.name) for d in rows)
    print(f"{'name':<{width}}  {'f(u)':<32}  {'OPD+ advantage w_f(u)':<22}  bounded w")
    for d in rows:
        print(f"{d.name:<{width}}  {d.f_expr:<32}  {d.w_expr:<22}  {'yes' if d.bounded_weight else 'no'}")
    return 0


def _cmd_toy(args) -> int:
    from opdlab.experiments.montecarlo import DIVERGENCES, estimator_cosines

    names = args.divergence or list(DIVERGENCES)
    topk = bool(args.teacher_topk)
    for key, classic, sparse in (("n_tokens", 8, 2000), ("temperature", 1.0, 0.3), ("n_toys", 100, 20)):
        if getattr(args, key) is None:  # each mode's own default
            setattr(args, key, sparse if topk else classic)
    if topk:
        return _toy_topk(args, names)
    cosines = estimator_cosines(names, n_toys=args.n_toys, n_tokens=args.n_tokens, seed=args.seed,
                                temperature=args.temperature)
    stats = cosines.groupby(["divergence", "method"], sort=False).agg(
        cosine=("cosine", "mean"), min_cosine=("cosine", "min"), relative_bias=("relative_bias", "mean"))
    print(f"cos(E[g], grad D_f), exact, mean over {args.n_toys} random toys (K = {args.n_tokens} tokens, "
          f"temperature {args.temperature}, seeds {args.seed}..{args.seed + args.n_toys - 1})")
    width = max(len("divergence"), *(len(n) for n in cosines["divergence"].unique()))
    print(f"{'divergence':<{width}}  {'OPD':>7}  {'OPD+':>7}  {'OPD min':>7}  {'OPD rel. bias':>13}")
    for name in cosines["divergence"].unique():
        opd, plus = stats.loc[(name, "opd")], stats.loc[(name, "opd_plus")]
        print(f"{name:<{width}}  {opd.cosine:7.3f}  {plus.cosine:7.3f}  {opd.min_cosine:7.3f}  "
              f"{opd.relative_bias:13.3f}")
    if args.csv:
        _write_csv(cosines, args.csv)
    return 0


def _toy_topk(args, names) -> int:
    from opdlab.exact.topk_toy import topk_table

    n_tokens, temperature, k = args.n_tokens, args.temperature, args.teacher_topk
    table = topk_table(names, k, n_toys=args.n_toys, n_tokens=n_tokens, seed=args.seed, temperature=temperature)
    table["estimator"] = table["method"] + table["baseline"].map({"none": "", "tail": "+tail"})
    means = table.groupby(["divergence", "estimator"], sort=False)[["cosine", "relative_variance"]].mean()
    columns = list(table["estimator"].unique())
    print(f"teacher top-{k} of {n_tokens} tokens (S holds {table['teacher_mass'].mean():.2f} of the teacher's mass), "
          f"exact, mean over {args.n_toys} toys (temperature {temperature}, student = teacher + N(0, 1) logits, "
          f"seeds {args.seed}..{args.seed + args.n_toys - 1})")
    width = max(len("divergence"), *(len(n) for n in table["divergence"].unique()))
    for value, title in (("cosine", "cos(E[g], grad D_f)"),
                         ("relative_variance", "E||g - grad D_f||^2 / ||grad D_f||^2, one sample")):
        print(f"\n{title}\n{'divergence':<{width}}  " + "  ".join(f"{c:>15}" for c in columns))
        for name in table["divergence"].unique():
            fmt = "15.4f" if value == "cosine" else "15.4g"
            print(f"{name:<{width}}  " + "  ".join(f"{means.loc[(name, c), value]:{fmt}}" for c in columns))
    if args.csv:
        _write_csv(table.drop(columns="estimator"), args.csv)
    return 0


def _cmd_train(args) -> int:
    from opdlab.config.presets import resolve
    from opdlab.rundir.reader import stored_config, stored_runtime
    from opdlab.training.distributed import world
    from opdlab.training.loop import train

    if not args.run_dir.strip():
        raise UserError("RUN_DIR is empty: give a new directory, or one that holds a run to resume")
    recorded = stored_config(args.run_dir) if Path(args.run_dir).is_dir() else None
    # resuming: the recorded spec is the truth, and -p may only repeat it (RunLog names any field that differs),
    # or change the runtime (device, cache, threads, compile_decode, ...), which is never part of a run's identity
    flat = {key: _literal(value) for key, value in args.parameter}
    if args.quiet:
        flat["progress"] = False
    last = stored_runtime(args.run_dir) if recorded is not None else None
    spec, runtime = resolve(flat, recorded, last)
    evals = train(spec, args.run_dir, runtime)
    last = evals[evals["kind"] == "eval"].iloc[-1]
    if world().is_main:  # under torchrun: one summary, from rank 0
        print(f"{args.run_dir}: step {int(last['step'])}, held-out greedy accuracy {last['greedy_accuracy']:.3f}, "
              f"avg@{spec.eval.eval_samples} {last['sampled_accuracy']:.3f}")
    return 0


def _checkpoint_dir(path: str) -> Path:
    """``path``, or its ``checkpoint/`` when ``path`` is a run directory written by ``opdlab train``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such directory: {path}")
    return layout.model_dir(path)


def _eval_rows(task, examples, rollouts, k: int, decoding: str):
    """``tasks.score_batch`` of the rollouts' completions (k per example, in order), with the columns
    ``decoding``, ``example`` (index into ``examples``) and ``sample`` (0..k-1) in front."""
    from opdlab.tasks import score_batch

    texts = [text for r in rollouts for text in r.texts]
    rows = score_batch(task, [ex for ex in examples for _ in range(k)], texts)
    rows.insert(0, "sample", rows.pop("index") % k)
    rows.insert(0, "example", [i // k for i in range(len(rows))])
    rows.insert(0, "decoding", decoding)
    return rows


def _cmd_eval(args) -> int:
    import pandas as pd
    import torch

    from opdlab.config.spec import EvalSpec
    from opdlab.lm.device import pick_device
    from opdlab.lm.modeling import load_model
    from opdlab.lm.sampling import sampled_accuracy
    from opdlab.lm.tokenizer import check_task_tokenizer
    from opdlab.tasks import get_task, summarize
    from opdlab.training.step import EVAL_SEED, eval_examples, max_new_tokens

    seed = EVAL_SEED if args.seed is None else args.seed
    n, k = args.n or EvalSpec.eval_n, args.samples or EvalSpec.eval_samples
    task, device = get_task(args.task), pick_device(args.device)
    path = _checkpoint_dir(args.model_dir)
    model, tokenizer = load_model(path, device)
    check_task_tokenizer(model, tokenizer, task, path)
    model.eval()
    examples = eval_examples(task, n, seed)
    budget = args.max_new_tokens or max_new_tokens(task)
    _, greedy = sampled_accuracy(model, tokenizer, task, examples, k=1, greedy=True, max_new_tokens=budget)
    generator = torch.Generator(device=device).manual_seed(seed)
    _, sampled = sampled_accuracy(model, tokenizer, task, examples, k=k, generator=generator,
                                  max_new_tokens=budget)
    rows = pd.concat([_eval_rows(task, examples, greedy, 1, "greedy"),
                      _eval_rows(task, examples, sampled, k, "sampled")], ignore_index=True)
    print(f"{path} on {task.name}: {n} held-out examples (test split, seed {seed}), "
          f"at most {budget} new tokens, {device}")
    header = f"{'decoding':<14}  {'accuracy':>8}  {'malformed':>9}" + (f"  {'call accuracy':>13}"
                                                                           if task.scores_calls else "")
    print(header)
    for decoding, label in (("greedy", "greedy"), ("sampled", f"avg@{k} (T=1)")):
        s = summarize(rows[rows["decoding"] == decoding])
        line = f"{label:<14}  {s['accuracy']:8.3f}  {s['malformed_rate']:9.3f}"
        print(line + (f"  {s['call_accuracy']:13.3f}" if task.scores_calls else ""))
    if args.csv:
        _write_csv(rows, args.csv)
    return 0


def _cmd_audit(args) -> int:
    from opdlab.audit.expected import (EstimatorFunctionError, audit, catalogue, estimator, format_verdicts,
                                       load_function, verdicts)

    entries = catalogue()
    if args.list:
        for e in entries.values():
            print(f"{e.name:<30} {e.mode:<26} claims {e.claims or '-'}")
        return 0
    unknown = [n for n in args.names if n not in entries]
    if unknown:
        raise UserError(f"unknown catalogue estimator {unknown[0]!r}; known: {', '.join(entries)}")
    chosen = [entries[n] for n in args.names]
    if args.function and not args.mode:
        raise UserError("--function needs --mode: backprop, policy_gradient or importance_ratio")
    try:
        if args.function:
            chosen.append(estimator(load_function(args.function), args.mode, claims=args.claims,
                                    scope="sequence" if args.sequence_scope else "token_local"))
        frame = audit(chosen or None, kinds=args.kind or ["categorical", "sequence"], n_toys=args.n_toys,
                      seed=args.seed)
    except EstimatorFunctionError as err:  # raised in the user's file: one line unless --traceback
        if args.traceback:
            raise err.__cause__ from None
        raise
    print(f"exact expected gradients on {args.n_toys} random toys per kind (seeds {args.seed}..."
          f"{args.seed + args.n_toys - 1}); cosines are means over toys")
    print(format_verdicts(verdicts(frame)))
    if len(chosen) == 1:
        print(f"\n{chosen[0].name}: {chosen[0].doc or '(no docstring)'}\n")
        source = chosen[0].source
        if source is not None:
            print(f"source: {source.repo} {source.path} @ {source.version} lines {source.lines or '-'}\n"
                  f"  {source.excerpt or source.note}\ndefaults: {source.defaults}\n")
        print(frame.groupby(["kind", "target", "divergence"], sort=False)[["cosine", "relative_error", "scale"]]
              .mean().round(4).to_string())
    if args.csv:
        _write_csv(frame, args.csv)
    return 0


def _cmd_report(args) -> int:
    from opdlab.report.render import ROOT, check, write

    root = args.root or ROOT
    if not args.check:
        for where in write(root):
            print(f"wrote {where}")
        return 0
    problems = check(root)
    for line in problems:
        print(f"opdlab report: {line}", file=sys.stderr)
    if problems:
        print("opdlab report: run `opdlab report` to render them again from the data", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ty = sub.add_parser("toy", help="exact cosine of the OPD and OPD+ expected gradients to the true gradient "
                                    "on random categorical toys")
    ty.add_argument("-d", "--divergence", nargs="+", action="extend", metavar="DIVERGENCE",
                    help="registry names, e.g. forward_kl gjsd:0.5 (default: the nine of notebook 02)")
    ty.add_argument("--seed", type=int, default=0, help="first toy's seed; toys use seed, seed + 1, ...")
    ty.add_argument("--n-toys", type=_positive_int, help="number of random toys (default 100; 20 with --teacher-topk)")
    ty.add_argument("--n-tokens", type=_positive_int, help="vocabulary size K of each toy (default 8; 2000 with "
                                                             "--teacher-topk)")
    ty.add_argument("--temperature", type=float,
                    help="logits ~ N(0, 1) / temperature; lower is peakier (default 1; 0.3 with --teacher-topk)")
    ty.add_argument("--teacher-topk", type=int, default=0, metavar="K",
                    help="K > 0: OPD+ from the teacher's top-K against one-sample OPD+, the full vocabulary and "
                         "the peers' sparse forms (cosine, relative variance)")
    ty.add_argument("--csv", metavar="PATH", help="write the tidy table (one row per toy, divergence, method)")
    ty.set_defaults(func=_cmd_toy)

    dv = sub.add_parser("divergences", help="list the f-divergences in the registry")
    dv.set_defaults(func=_cmd_divergences)
    tr = sub.add_parser("train", help="train a student by OPD/OPD+ (resumes if RUN_DIR holds a checkpoint)")
    tr.add_argument("run_dir", help=f"run directory: {layout.CONFIG}, {layout.METRICS}, {layout.CHECKPOINT}/")
    tr.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                    help="a RunSpec or Runtime field, or preset NAME (e.g. -p preset smoke -p divergence forward_kl)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="held-out accuracy of a local checkpoint on a task")
    ev.add_argument("model_dir", help="a save_pretrained directory with its tokenizer, or a run directory")
    ev.add_argument("--task", required=True, help="task name (arithmetic, tool_use, gsm_symbolic, bfcl_simple)")
    ev.add_argument("-n", type=_positive_int, help="held-out examples (default: EvalSpec.eval_n, 128)")
    ev.add_argument("--samples", type=_positive_int,
                    help="K completions per example for avg@K (default: EvalSpec.eval_samples, 2)")
    ev.add_argument("--seed", type=int, help="seed of the held-out examples and of sampling (default: "
                                             "train.EVAL_SEED, the examples training evaluates on)")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    ev.add_argument("--max-new-tokens", type=_positive_int,
                    help="completion budget (default: the task's, as in training)")
    ev.add_argument("--csv", metavar="PATH", help="write per-completion scores (score_batch columns)")
    ev.set_defaults(func=_cmd_eval)

    au = sub.add_parser("audit", help="which divergence's gradient a per-token estimator follows (exact toys)")
    au.add_argument("names", nargs="*", help="catalogue estimators (default: the whole catalogue; see --list)")
    au.add_argument("--list", action="store_true", help="list the catalogue and exit")
    au.add_argument("--function", metavar="MODULE:FUNCTION",
                    help="your estimator: a function of logp_student_BT, logp_teacher_BT (and optionally "
                         "logp_student_BTV, logp_teacher_BTV) returning per-token values (B, T)")
    au.add_argument("--mode", choices=("backprop", "policy_gradient", "importance_ratio"),
                    help="how --function's gradient is taken")
    au.add_argument("--claims", metavar="DIVERGENCE", help="the registry divergence --function is meant to follow")
    au.add_argument("--sequence-scope", action="store_true",
                    help="--function claims the sequence-level gradient (default: token-local)")
    au.add_argument("--kind", nargs="+", choices=("categorical", "sequence"),
                    help="toy kinds (default: both)")
    au.add_argument("--n-toys", type=_positive_int, default=50, help="random toys per kind (default 50)")
    au.add_argument("--seed", type=int, default=0, help="first toy's seed (default 0)")
    au.add_argument("--csv", metavar="PATH", help="write the tidy audit table")
    au.add_argument("--traceback", action="store_true",
                    help="when --function raises, show its whole traceback instead of one line")
    au.set_defaults(func=_cmd_audit)

    rp = sub.add_parser("report", help="render docs/results.md and the README's tables from figures/data")
    rp.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each document or region "
                                                         "that differs from what the data gives")
    rp.add_argument("--root", help="repository root (default: the one this opdlab is imported from)")
    rp.set_defaults(func=_cmd_report)

    nb = sub.add_parser("notebooks", help="execute notebooks headlessly with papermill")
    nb.add_argument("names", nargs="*", help="notebook numbers or names (default: all, in order)")
    nb.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="override a parameter (a Python literal, else a string); checked against the notebook")
    nb.add_argument("--figures-dir", help="write figures here instead of the notebook's default (figures/)")
    nb.add_argument("--output-dir", help="where executed copies go (default notebooks/_executed/)")
    nb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    nb.set_defaults(func=_cmd_notebooks)
    return parser


_OS_HINTS = {errno.ENOSPC: "free space on that disk and run the same command again (a run resumes from its "
                          "last checkpoint)",
             errno.EDQUOT: "free space in your quota and run the same command again",
             errno.EACCES: "choose a path you may write to", errno.EPERM: "choose a path you may write to",
             errno.EROFS: "the file system is read-only: choose a path on a writable one",
             errno.ENOTDIR: "a part of the path is a file, not a directory",
             errno.EISDIR: "a directory stands where a file is expected"}


def _os_message(err: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do (``_OS_HINTS``)."""
    if err.errno is None or err.strerror is None:  # raised by opdlab with a message of its own
        return str(err)
    where = f" ({err.filename})" if err.filename else ""
    hint = _OS_HINTS.get(err.errno)
    return f"{err.strerror.lower()}{where}" + (f"; {hint}" if hint else "")


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input exits with status 2 and a one-line message, Ctrl-C with status 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"opdlab {args.command}: error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"opdlab {args.command}: error: {_os_message(err)}", file=sys.stderr)
    except KeyboardInterrupt as err:
        print(f"opdlab {args.command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
