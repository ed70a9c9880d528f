"""Benchmark: the main job end to end, as a newcomer meets it: ``make figures`` in a fresh clone of the committed
tree, with an empty model cache (every teacher and warm-up trained, SmolLM2 converted), setup included.

It clones ``HEAD`` into a temporary folder, runs ``make figures`` there with ``OPDLAB_CACHE`` set to an empty
folder, and reads the seconds ``opdlab notebooks`` prints per notebook (``NAME.ipynb: S s -> ...``); the rest of
the wall time is setup (the virtual environment, the packages) and ``opdlab report``. It writes
``benchmarks/results/make_figures.csv`` (``commit, part, seconds``; ``part`` is a notebook, ``setup and report`` or
``total``), which ``docs/performance.md`` renders. Nothing else may run on the machine meanwhile: the job's own
tables record seconds per step. ``--from-log LOG --seconds S --commit C`` rebuilds the CSV from the output of such
a run instead (its total wall time in seconds and the commit it ran).

    python benchmarks/bench_make_figures.py            # about 25 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "make_figures.csv"
LINE = re.compile(r"^(\d\d_[\w]+)\.ipynb: ([\d.]+) s -> ", re.MULTILINE)


def parts(log: str, total: float, commit: str) -> pd.DataFrame:
    """The CSV's rows from ``make figures``' output ``log`` and its wall time ``total`` (seconds)."""
    found = [(name, float(seconds)) for name, seconds in LINE.findall(log.replace("\r", "\n"))]
    if not found:
        raise SystemExit("no 'NAME.ipynb: S s -> ...' line in the log: was it the output of `make figures`?")
    rows = [dict(commit=commit, part=name, seconds=seconds) for name, seconds in found]
    rows.append(dict(commit=commit, part="setup and report", seconds=round(total - sum(s for _, s in found), 1)))
    rows.append(dict(commit=commit, part="total", seconds=total))
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-log", type=Path, default=None, help="output of a finished `make figures`")
    parser.add_argument("--seconds", type=float, default=None, help="its wall time (with --from-log)")
    parser.add_argument("--commit", default=None, help="the commit it ran (with --from-log)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.from_log is not None:
        if args.seconds is None or args.commit is None:
            parser.error("--from-log needs --seconds and --commit")
        frame = parts(args.from_log.read_text(errors="replace"), args.seconds, args.commit)
    else:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        with tempfile.TemporaryDirectory() as tmp:
            clone, cache = Path(tmp) / "opdlab", Path(tmp) / "cache"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            cache.mkdir()
            print(f"make figures in a fresh clone of {commit} ({clone}), empty cache: about 25 minutes", flush=True)
            start = time.perf_counter()
            done = subprocess.run(["make", "figures"], cwd=clone, env={**os.environ, "OPDLAB_CACHE": str(cache)},
                                  capture_output=True, text=True)
            total = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"make figures failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            frame = parts(done.stdout + done.stderr, total, commit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    for row in frame.itertuples():
        print(f"{row.part:>24}: {row.seconds / 60:5.1f} min")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
