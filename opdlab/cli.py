"""Command line: ``opdlab <command>`` (or ``python -m opdlab``).

    opdlab notebooks [NAME ...] [-p KEY VALUE ...]   execute notebooks with papermill (all by default)
    opdlab divergences                              the registry: f, OPD+ advantage, bounded or not
    opdlab train RUN_DIR [-p FIELD VALUE ...]       one OPD/OPD+ run (TrainConfig fields), resumable
"""
from __future__ import annotations

import argparse
import ast
import sys

__all__ = ["main", "build_parser"]


def _literal(text: str):
    """A parameter value as a Python literal when it is one (3, 0.5, [1, 2], True), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _cmd_notebooks(args) -> int:
    from opdlab.notebook_runner import execute_notebook, list_notebooks

    names = args.names or [p.stem for p in list_notebooks()]
    parameters = {key: _literal(value) for key, value in args.parameter}
    if args.figures_dir:
        parameters["figures_dir"] = args.figures_dir
    for name in names:
        execute_notebook(name, parameters, output_dir=args.output_dir, progress=not args.quiet)
    return 0


def _cmd_divergences(args) -> int:
    from opdlab.divergences import get, names

    rows = [get(n) for n in names() if ":" not in n] + [get("gjsd:0.1"), get("alpha:0.5")]
    width = max(len(d.name) for d in rows)
    print(f"{'name':<{width}}  {'f(u)':<32}  {'OPD+ advantage w_f(u)':<22}  bounded w")
    for d in rows:
        print(f"{d.name:<{width}}  {d.f_expr:<32}  {d.w_expr:<22}  {'yes' if d.bounded_weight else 'no'}")
    return 0


def _cmd_train(args) -> int:
    from opdlab.config import TrainConfig
    from opdlab.train import train

    config = TrainConfig.from_dict({key: _literal(value) for key, value in args.parameter})
    evals = train(config, args.run_dir, progress=not args.quiet)
    last = evals[evals["kind"] == "eval"].iloc[-1]
    print(f"{args.run_dir}: step {int(last['step'])}, held-out greedy accuracy {last['greedy_accuracy']:.3f}, "
          f"avg@{config.eval_samples} {last['sampled_accuracy']:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    nb = sub.add_parser("notebooks", help="execute notebooks headlessly with papermill")
    nb.add_argument("names", nargs="*", help="notebook numbers or names (default: all, in order)")
    nb.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="override a parameter (a Python literal, else a string); checked against the notebook")
    nb.add_argument("--figures-dir", help="write figures here instead of the notebook's default (figures/)")
    nb.add_argument("--output-dir", help="where executed copies go (default notebooks/_executed/)")
    nb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    nb.set_defaults(func=_cmd_notebooks)

    dv = sub.add_parser("divergences", help="list the f-divergences in the registry")
    dv.set_defaults(func=_cmd_divergences)
    tr = sub.add_parser("train", help="train a student by OPD/OPD+ (resumes if RUN_DIR holds a checkpoint)")
    tr.add_argument("run_dir", help="run directory: config.json, metrics.jsonl, checkpoint/")
    tr.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                    help="a TrainConfig field (e.g. -p divergence forward_kl -p method opd)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"opdlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
