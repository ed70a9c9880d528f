"""benchmarks/bench_main_job.py with --tiny: the account's table has its columns, positive counts and FLOPs, the
job's counts as the notebooks give them, and a printed total that is the sum of its phases; its report region
renders the bound and the gap."""
import contextlib
import importlib
import io
import math
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

import opdlab.training.step
from opdlab.app.notebooks import notebook_parameters, resolve_notebook
from opdlab.config import presets
from opdlab.config.recipe import ModelRecipe
from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec
from opdlab.core import objective
from opdlab.lm import packed
from opdlab.lm.modeling import build_model
from opdlab.lm.sampling import completion_logits, sample as sample_completions
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.report import render as report
from opdlab.tasks import get_task
from opdlab.training.step import Models, Trainer, sample

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_main_job.py"
COLUMNS = ["notebook", "phase", "task", "arm", "count", "seconds_each", "seconds_total", "gflop_total",
           "gflops_per_s", "peak_fraction", "bound_seconds"]
LAST_LINE = re.compile(r"main job: measured ([\d.]+) min, bound at peak ([\d.]+) min")


@pytest.fixture(scope="module")
def bench():
    """The script as a module (its folder on the path, as when it runs: it imports bench_train from there)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield importlib.import_module("bench_main_job")
    finally:
        sys.path.remove(str(SCRIPT.parent))


def opdlab_attributes() -> dict:
    """``{module name: its attributes}`` of every imported ``opdlab`` module."""
    return {name: dict(vars(module)) for name, module in list(sys.modules.items())
            if (name == "opdlab" or name.startswith("opdlab.")) and module is not None}


def changed_attributes(before: dict, after: dict) -> list[str]:
    """``module.attribute`` for every attribute of a module in ``before`` that is another object, gone or new in
    ``after``; a submodule that the run imported for the first time is not a change."""
    changed = []
    for name, old in before.items():
        new = after[name]
        for key in old.keys() | new.keys():
            if key in old and key in new and old[key] is new[key]:
                continue
            if key not in old and isinstance(new[key], types.ModuleType) and new[key].__name__ == f"{name}.{key}":
                continue
            changed.append(f"{name}.{key}")
    return sorted(changed)


class _Watched(types.ModuleType):
    """A module that records every attribute set or deleted on it from outside (``module.x = ...``, ``setattr``):
    a wrapper put in and taken out again during a run leaves no trace in a snapshot, but is recorded here."""

    writes: list = []

    def __setattr__(self, key, value):
        if not (isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{key}"):
            _Watched.writes.append(f"{self.__name__}.{key}")  # (an import binding a submodule is not a write)
        super().__setattr__(key, value)

    def __delattr__(self, key):
        _Watched.writes.append(f"{self.__name__}.{key}")
        super().__delattr__(key)


@contextlib.contextmanager
def watch_opdlab():
    """Within: every imported ``opdlab`` module records outside writes to its attributes; yields the list."""
    modules = [m for name, m in list(sys.modules.items())
               if (name == "opdlab" or name.startswith("opdlab.")) and type(m) is types.ModuleType]
    writes = _Watched.writes = []
    for module in modules:
        module.__class__ = _Watched
    try:
        yield writes
    finally:
        for module in modules:
            types.ModuleType.__setattr__(module, "__class__", types.ModuleType)  # not recorded as a write


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    """One --tiny run on one thread: ``(table returned, table written, printed lines, output directory, (opdlab's
    modules' attributes before the run, after it, and the writes to them during it))``."""
    out, threads, printed = tmp_path_factory.mktemp("main_job"), torch.get_num_threads(), io.StringIO()
    before = opdlab_attributes()
    try:
        with contextlib.redirect_stdout(printed), watch_opdlab() as writes:
            job = bench.main(["--tiny", "--threads", "1", "--steps", "1", "--warmup", "1", "--eval-repeats", "1",
                              "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return (job, pd.read_csv(out / "main_job.csv"), printed.getvalue().splitlines(), out,
            (before, opdlab_attributes(), writes))


def check_total(job: pd.DataFrame, last_line: str) -> None:
    """The printed total is the sum of the table's phases (to the printed rounding), and each row's totals are
    its cost times its count."""
    measured, bound = map(float, LAST_LINE.fullmatch(last_line).groups())
    assert measured == pytest.approx(job["seconds_total"].sum() / 60, abs=0.006)
    assert bound == pytest.approx(job["bound_seconds"].sum() / 60, abs=0.006)
    assert job["seconds_total"].to_numpy() == pytest.approx((job["seconds_each"] * job["count"]).to_numpy())
    assert job["bound_seconds"].to_numpy() == pytest.approx((job["gflop_total"] / job["peak_gflops"]).to_numpy())


def test_the_table_has_its_columns_and_positive_counts_and_flops(tiny):
    job, written, lines, out, _ = tiny
    assert list(written.columns[:len(COLUMNS)]) == COLUMNS
    assert len(written) == len(job) and (out / "main_job.png").stat().st_size > 0
    assert (written["count"] > 0).all() and (written["seconds_each"] > 0).all()
    model = written[written["phase"] != "rest"]  # advantages and metrics: no model FLOPs are counted for them
    assert (model["gflop_total"] > 0).all() and (model["peak_fraction"] > 0).all()
    assert (written.loc[written["phase"] == "rest", "gflop_total"] == 0).all()
    assert {"decode", "teacher", "student_forward", "student_backward", "optimizer", "evaluation", "sft",
            "step_noise"} <= set(written["phase"])
    steps = written.set_index(["notebook", "task", "arm", "phase"])["gflop_total"].unstack("phase").dropna(
        subset=["student_forward"])
    # counted, not assumed: each product's backward is two products (2x), attention's five (2.5x: the scores are
    # recomputed), so a backward charged as twice its forward would fail the strict bound
    ratio = (steps["student_backward"] / steps["student_forward"]).to_numpy()
    assert ((ratio > 2) & (ratio <= 2.5)).all()


def test_the_printed_total_is_the_sum_of_the_phases(tiny):
    job, written, lines, _, _ = tiny
    check_total(written, lines[-1])
    broken = written.copy()
    broken.loc[0, "seconds_total"] += 60.0  # a row that no longer adds up: the check must see it
    with pytest.raises(AssertionError):
        check_total(broken, lines[-1])


def test_the_counts_are_the_notebooks_runs(tiny):
    """Notebook 04: each arm's own steps x seeds per task, and an evaluation at step 0, every eval_every and the
    end; notebook 09: its trained variants x seeds, less the runs notebook 04 already trained (read back)."""
    _, written, _, _, _ = tiny
    p = notebook_parameters(resolve_notebook("04"))
    preset = presets.get(p["preset"])
    n_seeds = len(preset.seeds if p["seeds"] is None else p["seeds"])
    nb04 = written[written["notebook"] == resolve_notebook("04").stem]
    for task in p["tasks"]:
        spec = preset.spec_for(task)
        steps = [spec.replace(**arm).optim.steps for arm in p["arms"]]
        rows = nb04[nb04["task"] == task].set_index(["phase", "arm"])["count"]
        assert rows.loc["decode"].sum() == sum(steps) * n_seeds
        evals = [1 + math.ceil(s / spec.eval.eval_every) for s in steps]  # 0, every eval_every, the last
        n_evals = rows.loc[("evaluation", "every arm")] + rows.loc[("final_evaluation", "every arm")]
        divergences = len({arm["divergence"] for arm in p["arms"]})  # the arms of a seed share a start per divergence
        assert n_evals == (sum(evals) - len(p["arms"]) + divergences) * n_seeds
        assert rows.loc["step_noise"].sum() == 1  # one call for every arm that samples from the student
    p9 = notebook_parameters(resolve_notebook("09"))
    nb09 = written[written["notebook"] == resolve_notebook("09").stem].set_index("phase")["count"]
    preset9 = presets.get(p9["preset"])
    seeds9 = preset9.seeds if p9["seeds"] is None else p9["seeds"]
    shared = sum(s in (preset.seeds if p["seeds"] is None else p["seeds"]) for s in seeds9)  # clip ±2, γ 0: nb04's
    trained = len(p9["clips"]) * len(p9["trained_gammas"]) * len(seeds9) - shared
    assert nb09["decode"] == preset9.spec.optim.steps * trained
    assert nb09["step_noise"] == 1  # one call for every variant
    assert "sft" not in nb09.index  # notebook 09's models are notebook 04's, trained once


def test_evaluations_follow_the_training_loop(bench):
    spec = presets.get("notebook04").spec
    spec = spec.replace(steps=100, eval_every=25, final_eval_n=None)
    assert bench.evaluations(spec) == (5, 0)  # steps 0, 25, 50, 75, 100
    assert bench.evaluations(spec.replace(steps=10, eval_every=4)) == (4, 0)  # 0, 4, 8, 10
    assert bench.evaluations(spec.replace(final_eval_n=2 * spec.eval.eval_n)) == (4, 1)


def test_the_run_changes_no_attribute_of_opdlab(tiny):
    *_, (before, after, writes) = tiny
    assert len(before) > 10 and "opdlab.training.step" in before  # the bench's imports were in place before the run
    assert changed_attributes(before, after) == [] and writes == []


def test_a_changed_attribute_is_seen(monkeypatch):
    before = opdlab_attributes()
    with watch_opdlab() as writes:
        monkeypatch.setattr(opdlab.training.step, "sample", lambda *args: None)  # what a wrapping benchmark would do
        assert changed_attributes(before, opdlab_attributes()) == ["opdlab.training.step.sample"]
        monkeypatch.undo()  # and then restore: the snapshot no longer shows it, the watch does
    assert changed_attributes(before, opdlab_attributes()) == []
    assert writes == ["opdlab.training.step.sample", "opdlab.training.step.sample"]
    assert type(opdlab.training.step) is types.ModuleType  # the watch is gone


def test_the_report_region_states_the_bound_and_the_gap(tiny, tmp_path):
    _, written, lines, out, _ = tiny
    assert "No result is committed" in report.main_job(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "main_job.csv").write_text((out / "main_job.csv").read_text())
    text = report.main_job(tmp_path)
    measured, bound = written["seconds_total"].sum() / 60, written["bound_seconds"].sum() / 60
    assert f"{measured:.1f} minutes measured against a bound of {bound:.1f}" in text
    assert f"{measured / bound:.1f}× its bound" in text


def _models():
    """A teacher three times as wide as its student, so that FLOPs charged to the wrong model show."""
    task = get_task("arithmetic")
    tok = char_tokenizer(task.alphabet)
    teacher, student = (build_model(ModelRecipe(hidden=h, layers=1, heads=2, intermediate=2 * h), tok).eval()
                        for h in (48, 16))
    return task, Models(teacher, student, tok)


def forward_flops(model, tokens: int, head_rows: int, rows: int, row_len: int) -> tuple[int, int]:
    """``(products, attention)``: the FLOPs of a forward of ``model`` (bias-free, as built here) over ``tokens``
    tokens, its output head over ``head_rows`` of them, and attention over ``rows`` rows of ``row_len`` (every
    query against every key of its row, as the kernel computes it): 2 x rows x columns per token and product,
    4 x row_len^2 x head size per row, head and layer."""
    c = model.config
    linear = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    attention = 4 * c.num_hidden_layers * rows * c.num_attention_heads * row_len ** 2 * c.head_dim
    return 2 * tokens * linear + 2 * head_rows * model.lm_head.weight.numel(), attention


def _first_step(bench, spec, models, runtime):
    """The bench's FLOPs per phase of a first step (no warm-up), and that step's rollout drawn again."""
    task = get_task("arithmetic")
    phases = bench.measure_steps(spec, task, models, runtime, warmup=0, steps=1)
    tr = Trainer(spec, task, models.teacher, models.student, models.tokenizer, runtime)
    return {p: f for p, (_, f) in phases.items()}, tr, sample(tr, tr.batch(0))


@pytest.mark.parametrize("method", ["opd_plus", "supervised_kd"])
def test_each_phase_is_charged_to_the_model_that_ran_it(bench, method):
    """The padded scorer's FLOPs are the products' and attention's over the whole padded batch, the head over the
    last T + 1 positions; the backward doubles every product and takes 2.5 forwards of attention."""
    task, models = _models()
    spec = RunSpec.from_dict(dict(task="arithmetic", method=method, steps=2, prompts_per_step=3, samples_per_prompt=2,
                                  max_new_tokens=12, eval_n=4))
    flops, tr, rollout = _first_step(bench, spec, models, Runtime(device="cpu", progress=False, scorer="padded"))
    (B, L), T = rollout.full()[0].shape, rollout.completion_ids_BT.shape[1]
    teacher, student = (forward_flops(m, B * L, B * (T + 1), B, L) for m in (models.teacher, models.student))
    assert flops["teacher"] == sum(teacher) and flops["student_forward"] == sum(student)
    assert flops["student_backward"] == 2 * student[0] + 2.5 * student[1]
    assert flops["teacher"] != sum(student)  # the two models' counts differ: a swap would show
    # attention is counted on this CPU too: without the CPU kernel's formula, FlopCounterMode alone misses it
    with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
        with torch.no_grad():
            completion_logits(models.teacher, rollout, False)
    assert plain.get_total_flops() == teacher[0] < flops["teacher"]
    # decoding: what sampling these tokens costs the model that sampled them (the teacher for supervised_kd)
    sampler, other = (models.teacher, models.student) if objective.get(method).samples_from == "teacher" else (models.student,
                                                                                       models.teacher)
    decoded = {}
    for model in (sampler, other):
        generator = torch.Generator().manual_seed(spec.optim.seed)
        with bench.flop_counter() as counter:
            again = sample_completions(model, models.tokenizer, [ex.prompt for ex in tr.batch(0)], task,
                                       tr.max_new_tokens, generator, greedy=False, temperature=1.0)
        decoded[model is sampler] = counter.get_total_flops()
        if model is sampler:
            assert torch.equal(again.completion_ids_BT, rollout.completion_ids_BT)
    assert flops["decode"] == decoded[True] != decoded[False]


def test_packed_scoring_counts_each_prompt_once(bench):
    """The packed scorer runs each distinct prompt once and every real completion token, the head once per
    distinct scored position, attention over its rows."""
    task, models = _models()
    spec = presets.get("smoke").spec.replace(samples_per_prompt=4)
    flops, _, rollout = _first_step(bench, spec, models, Runtime(device="cpu", progress=False))
    packing, at = packed.pack_rollout(rollout)
    prompt_tokens, completion_tokens = int(rollout.prompt_attention_BP.sum()), int(rollout.attention_BT.sum())
    tokens = prompt_tokens // spec.optim.samples_per_prompt + completion_tokens
    assert len(packing.ids_N) == tokens < rollout.full()[0].numel()
    rows, row_len = packing.idx_BL.shape

    def expected(model, n):
        return sum(forward_flops(model, n, len(torch.unique(at)), rows, row_len))
    assert flops["teacher"] == expected(models.teacher, tokens)
    assert flops["student_forward"] == expected(models.student, tokens)
    assert flops["teacher"] < expected(models.teacher, prompt_tokens + completion_tokens)  # each prompt 4 times
