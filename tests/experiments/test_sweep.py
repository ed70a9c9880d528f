"""The sweep of notebook 04: worker processes, read-back of finished runs, reference lines, bad input."""
import pandas as pd
import pytest
import torch

from opdlab.errors import UserError
from opdlab.experiments.sweep import item_results, resolve_workers, sweep
from opdlab.rundir.reader import read_metrics
from runs import make

pytestmark = pytest.mark.slow

BASE, RUNTIME = make(steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=24, eval_every=1, eval_n=4,
                     eval_samples=1, checkpoint_every=1, device="cpu", teacher_hidden=32, teacher_layers=1,
                     teacher_sft_steps=3, student_hidden=16, student_layers=1, student_warmup_steps=2)


def _sweep(tmp_path, workers):
    return sweep(BASE, ["arithmetic"], ["forward_kl"], ["opd", "opd_plus"], [0], tmp_path / "runs",
                 RUNTIME.replace(cache=str(tmp_path / "cache")), workers=workers,
                 extra_arms=[["reverse_kl", "supervised_kd"], ("forward_kl", "opd")])  # the second is in the grid


def test_workers_give_every_run_and_the_references(tmp_path):
    evals, refs = _sweep(tmp_path, workers=2)
    assert sorted(evals["method"].unique()) == ["opd", "opd_plus", "supervised_kd"]
    assert set(evals.loc[evals["method"] == "supervised_kd", "divergence"]) == {"reverse_kl"}
    assert sorted(evals["step"].unique()) == [0, 1, 2] and len(evals) == 9
    assert set(refs["role"]) == {"teacher", "student"} and refs["value"].between(0, 1).all()
    # both methods start from the same warm-up student: identical step-0 evaluations
    start = evals[evals["step"] == 0].set_index("method")
    assert start.loc["opd", "exact_reverse_kl"] == start.loc["opd_plus", "exact_reverse_kl"]
    # a second sweep reads the finished runs back instead of training them again
    metrics = sorted((tmp_path / "runs").glob("*/metrics.jsonl"))
    before = [p.read_text() for p in metrics]
    again, refs_again = _sweep(tmp_path, workers=1)
    assert [p.read_text() for p in metrics] == before
    pd.testing.assert_frame_equal(again, evals)
    pd.testing.assert_frame_equal(refs_again, refs)
    # every run evaluated the same items in the same order, so arms pair item by item
    items = item_results(sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir()))
    assert len(items) == 3 * 3 * 4 and set(items["method"]) == {"opd", "opd_plus", "supervised_kd"}
    ids = items.groupby(["run", "step"])["item_id"].apply(tuple)
    assert ids.nunique() == 1 and len(set(ids.iloc[0])) == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, "many", True, None])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="workers must be a positive int or 'auto'"):
        resolve_workers(bad)


def test_auto_workers_is_one_process_on_cuda_and_the_cpus_on_cpu(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert resolve_workers("auto", "cpu") == 6
    assert resolve_workers(3, "cpu") == 3
    monkeypatch.setattr("opdlab.experiments.sweep.pick_device", lambda device: torch.device("cuda"))
    assert resolve_workers("auto", "cuda") == 1


def test_under_a_launcher_the_runs_go_one_at_a_time(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert resolve_workers("auto", "cpu") == 1 == resolve_workers(1)
    with pytest.raises(ValueError, match="workers = 2 under a launcher with 2 processes"):
        resolve_workers(2)


def test_the_pool_prints_the_running_runs_between_finished_ones(tmp_path, monkeypatch, capsys):
    """Between two finished runs the sweep says which runs are running and at which step, at most
    ``heartbeat.EVERY`` seconds apart (here 0.05 s, so that these tiny runs are caught running)."""
    from opdlab import heartbeat

    monkeypatch.setattr(heartbeat, "EVERY", 0.05)
    sweep(BASE.replace(steps=4), ["arithmetic"], ["forward_kl"], ["opd_plus"], [0, 1], tmp_path / "runs",
          RUNTIME.replace(cache=str(tmp_path / "cache"), progress=True), workers=2)
    lines = capsys.readouterr().out.splitlines()
    status = [line for line in lines if " runs done; running: " in line]
    assert status and all(line.split(" runs done")[0] in ("0/2", "1/2") for line in status), lines
    named = [line for line in status if "arithmetic-forward_kl-opd_plus-s" in line]
    assert named and all(" step " in line and "/4" in line for line in named), status
    finished = [line for line in lines if line.startswith(("[1/2] ", "[2/2] "))]
    assert len(finished) == 2, lines


def test_in_process_runs_print_their_step(tmp_path, monkeypatch, capsys):
    from opdlab import heartbeat

    monkeypatch.setattr(heartbeat, "EVERY", 0.0)
    sweep(BASE.replace(steps=3), ["arithmetic"], ["forward_kl"], ["opd_plus"], [0], tmp_path / "runs",
          RUNTIME.replace(cache=str(tmp_path / "cache"), progress=True), workers=1)
    steps = [line.split(": ")[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("arithmetic-forward_kl-opd_plus-s0-") and ": step " in line]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], steps


def test_variants_cross_every_arm_and_seed_in_one_pool(tmp_path):
    variants = [{"gamma": 0.0}, {"gamma": 0.5, "log_u_clip": 2.0}]
    evals, _ = sweep(BASE.replace(steps=1), ["arithmetic"], ["forward_kl"], ["opd_plus"], [0, 1], tmp_path / "runs",
                     RUNTIME.replace(cache=str(tmp_path / "cache")), workers=2, variants=variants)
    last = evals[evals["step"] == 1]
    got = sorted((r.gamma, None if pd.isna(r.log_u_clip) else r.log_u_clip, r.seed) for r in last.itertuples())
    assert got == [(0.0, None, 0), (0.0, None, 1), (0.5, 2.0, 0), (0.5, 2.0, 1)]
    assert last["run"].nunique() == 4


@pytest.mark.parametrize("bad", [[], {"gamma": 0.5}, [{"seed": 1}], [{"divergence": "jsd"}], ["gamma"]])
def test_bad_variants_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="variants must be"):
        sweep(BASE, ["arithmetic"], ["forward_kl"], ["opd_plus"], [0], tmp_path, RUNTIME, variants=bad)


@pytest.mark.parametrize("seeds, variants", [([0, 0], None), ([0], [{}, {"gamma": 0.0}])])  # gamma 0 is the default
def test_runs_that_would_share_a_directory_are_refused_before_any_training(tmp_path, seeds, variants):
    with pytest.raises(ValueError, match="would share the directory .*specs are the same.*drop the duplicate"):
        sweep(BASE, ["arithmetic"], ["forward_kl"], ["opd_plus"], seeds, tmp_path, RUNTIME, variants=variants)
    assert not (tmp_path / "runs").exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["tasks", "divergences", "methods", "seeds"])
def test_an_empty_list_is_refused_before_any_model_trains(tmp_path, name):
    lists = dict(tasks=["arithmetic"], divergences=["forward_kl"], methods=["opd_plus"], seeds=[0])
    lists[name] = []
    with pytest.raises(ValueError, match=f"{name} must be a non-empty list"):
        sweep(BASE, lists["tasks"], lists["divergences"], lists["methods"], lists["seeds"], tmp_path / "runs",
              RUNTIME.replace(cache=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def test_a_cache_path_that_is_a_file_is_refused_before_any_model_trains(tmp_path):
    from opdlab.tasks import get_task
    from opdlab.training.models import load_models

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        load_models(BASE, get_task("arithmetic"), RUNTIME.replace(cache=str(tmp_path / "file" / "cache")))


def test_a_greedy_only_tail_changes_nothing_but_the_tails_sampled_columns(tmp_path):
    """final_eval_sampled=False scores the last evaluation's items past eval_n greedy only: its paired data
    (every item's correct), the training and the references are what the full evaluation gives, and the skipped
    columns are empty, not zeros (the head's samples are drawn as an evaluation of
    eval_n items draws them, so they equal the full evaluation's only where eval_n fills whole batches of 128)."""
    out = {}
    for sampled in (True, False):
        base = BASE.replace(final_eval_n=8, final_eval_sampled=sampled)
        runs_dir = tmp_path / f"runs-{sampled}"
        evals, refs = sweep(base, ["arithmetic"], ["forward_kl"], ["opd_plus"], [0], runs_dir,
                            RUNTIME.replace(cache=str(tmp_path / "cache")), workers=1)
        run = item_results(sorted(p for p in runs_dir.iterdir() if p.is_dir()))
        train = read_metrics(runs_dir / evals["run"].iloc[0], volatile=False)
        train = train[train["kind"] == "train"].dropna(axis=1, how="all").drop(columns="run").reset_index(drop=True)
        out[sampled] = evals, refs, run[run["step"] == 2].reset_index(drop=True), train
    (_, refs_all, all_, train_all), (evals_head, refs_head, head, train_head) = out[True], out[False]
    assert (all_["correct"] == head["correct"]).all() and len(head) == 8
    cols = ["sampled_correct", "kl_reverse", "kl_forward", "exact_divergence"]
    assert head.loc[4:, cols].isna().all().all() and head.loc[:3, cols].notna().all().all()
    assert all_[cols].notna().all().all()
    last = evals_head[evals_head["step"] == 2].iloc[0]
    assert last["eval_items"] == 8 and last["sampled_items"] == 4
    assert (refs_all["value"].to_numpy() == refs_head["value"].to_numpy()).all()
    pd.testing.assert_frame_equal(train_all, train_head)
    assert len(train_head) == 2


def test_a_sweep_in_cohorts_gives_the_runs_a_sweep_of_single_runs_gives(tmp_path):
    """cohort=3 over 4 runs: a cohort of 3 and one run alone, in two workers; the same evaluations, to float
    rounding, as each run trained alone; a bad size is refused."""
    args = (BASE, ["arithmetic"], ["forward_kl"], ["opd", "opd_plus"], [0, 1])
    single, _ = sweep(*args, tmp_path / "single", RUNTIME.replace(cache=str(tmp_path / "cache")), workers=1)
    grouped, _ = sweep(*args, tmp_path / "cohort", RUNTIME.replace(cache=str(tmp_path / "cache")), workers=2,
                       cohort=3)
    assert list(grouped["run"]) == list(single["run"]) and len(single) == 12
    numbers = [c for c in single.columns if pd.api.types.is_float_dtype(single[c]) and not c.startswith("time_")]
    pd.testing.assert_frame_equal(grouped[numbers], single[numbers], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="cohort must be a positive int"):
        sweep(*args, tmp_path / "bad", RUNTIME.replace(cache=str(tmp_path / "cache")), cohort=0)


def test_a_failed_run_of_a_cohort_sweep_is_named_after_the_others_finish(tmp_path, monkeypatch):
    from opdlab.training import loop as train_module

    real = train_module.evaluate_and_log

    def disk_full_for_opd_s1(tr, log, tracker, step, final):
        if log is not None and "-opd-s1-" in log.dir.name and step == 1:
            raise OSError(28, "No space left on device", str(log.dir))
        return real(tr, log, tracker, step, final)

    monkeypatch.setattr(train_module, "evaluate_and_log", disk_full_for_opd_s1)
    runs_dir = tmp_path / "runs"
    with pytest.raises(UserError, match=r"1 of 4 runs failed \(each alone, the others are done\): "
                                        r"arithmetic-forward_kl-opd-s1-\w+: OSError: .*No space left.*error\.json"):
        sweep(BASE, ["arithmetic"], ["forward_kl"], ["opd", "opd_plus"], [0, 1], runs_dir,
              RUNTIME.replace(cache=str(tmp_path / "cache")), workers=1, cohort=2)
    finished = [d for d in runs_dir.iterdir() if d.is_dir() and d.name != "references"
                and read_metrics(d)["step"].max() == BASE.optim.steps]
    assert len(finished) == 3 and not any("-opd-s1-" in d.name for d in finished)


def _start(run_dir):
    """A run's step-0 metrics (less its own evaluation time) and its step-0 item records, as written."""
    metrics = read_metrics(run_dir)
    first = metrics[(metrics["kind"] == "eval") & (metrics["step"] == 0)].drop(columns=["time_eval", "run"])
    return first.dropna(axis=1, how="all").reset_index(drop=True), (run_dir / "items" / "step_0.csv").read_text()


def test_the_arms_of_a_seed_evaluate_their_start_once_and_write_what_alone_they_would(tmp_path):
    """The sweep keeps each distinct start evaluation once (arms of one seed and divergence share it); every run
    writes the step-0 metrics and item records that it writes trained alone, without sharing."""
    from opdlab.training.loop import train

    runtime = RUNTIME.replace(cache=str(tmp_path / "cache"))
    sweep(BASE, ["arithmetic"], ["forward_kl"], ["opd", "opd_plus"], [0, 1], tmp_path / "runs", runtime, workers=1,
          extra_arms=[("jsd", "opd_plus")])
    kept = sorted((tmp_path / "runs" / "references").glob("start-*.json"))
    # forward KL and JSD at two seeds each, and the references: the teacher and the warm-up (whose divergence,
    # the base spec's reverse KL, no run here shares)
    assert len(kept) == 2 * 2 + 2
    for method, divergence, seed in [("opd", "forward_kl", 1), ("opd_plus", "jsd", 0)]:
        spec = BASE.replace(method=method, divergence=divergence, seed=seed)
        alone = tmp_path / f"alone-{method}-{seed}"
        train(spec, alone, runtime)
        (swept,) = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith(f"arithmetic-{divergence}-"
                                                                                  f"{method}-s{seed}-")]
        metrics, items = _start(swept)
        metrics_alone, items_alone = _start(alone)
        assert items == items_alone
        pd.testing.assert_frame_equal(metrics, metrics_alone)


def test_a_shared_start_that_does_not_check_out_is_evaluated_again(tmp_path, capsys):
    from opdlab.training.loop import train

    runtime, shared = RUNTIME.replace(cache=str(tmp_path / "cache")), tmp_path / "shared"
    spec = BASE.replace(divergence="forward_kl", steps=1)
    train(spec, tmp_path / "a", runtime, shared=shared)
    (kept,) = shared.glob("start-*.json")
    for damage in (lambda text: text[:40], lambda text: text.replace('"key": "', '"key": "0', 1)):
        kept.write_text(damage(kept.read_text()))
        run_dir = tmp_path / f"b{len(list(tmp_path.glob('b*')))}"
        train(spec.replace(method="opd"), run_dir, runtime, shared=shared)
        assert "could not be used" in capsys.readouterr().err
        assert _start(run_dir)[1] == _start(tmp_path / "a")[1]
    train(spec.replace(method="opd", lr=1e-4), tmp_path / "c", runtime, shared=shared)  # kept again: read back
    assert "could not be used" not in capsys.readouterr().err
    assert _start(tmp_path / "c")[1] == _start(tmp_path / "a")[1]


def test_a_shared_start_reads_back_with_its_types(tmp_path, monkeypatch):
    """Item records with float32 thirds (three samples per item), NaN, bools and digit-only ids: a run reading the
    kept start gets the frame, and writes the CSV, of the run that computed it, byte for byte."""
    import numpy as np

    from opdlab.tasks import get_task
    from opdlab.training import references
    from opdlab.training.evaluate import ITEM_COLUMNS
    from opdlab.training.models import load_models
    from opdlab.training.references import evaluate_start
    from opdlab.training.step import Trainer

    items = pd.DataFrame(dict(
        item=[0, 1, 2], item_id=["000123456789", "abc", "0x1"], correct=[1, 0, 1],
        sampled_correct=np.array([1 / 3, 2 / 3, 0], dtype=np.float32), length=[3, 4, 5], hit_cap=[False, True, False],
        kl_reverse=[0.1, float("nan"), 1e-300], kl_forward=[1 / 3, 2.0, 0.0], divergence=[0.5, 0.25, 1.0]))
    metrics = dict(greedy_accuracy=2 / 3, time_eval=0.5, sampled_items=3)
    assert list(items.columns) == list(ITEM_COLUMNS)
    monkeypatch.setattr(references, "evaluate", lambda *args: (dict(metrics), items.copy()))
    spec, task = BASE.replace(eval_n=3), get_task("arithmetic")
    models = load_models(spec, task, RUNTIME.replace(cache=str(tmp_path / "cache")))
    tr = Trainer(spec, task, models.teacher, models.student, models.tokenizer, RUNTIME)
    evaluate_start(tr, None, None, tmp_path)
    got_metrics, got = evaluate_start(tr, None, None, tmp_path)  # read back
    assert len(list(tmp_path.glob("start-*.json"))) == 1
    assert got.to_csv(index=False) == items.to_csv(index=False)
    pd.testing.assert_frame_equal(got, items)
    assert list(got_metrics) == list(metrics) and got_metrics["sampled_items"] == 3


def test_auto_cohort_is_read_for_the_device_asked_for(monkeypatch):
    from opdlab.experiments import sweep as sweep_module

    monkeypatch.setattr(sweep_module, "AUTO_COHORT", {"cpu": 1, "cuda": 4})
    assert sweep_module.resolve_cohort("auto", "cpu") == 1
    monkeypatch.setattr(sweep_module, "pick_device", lambda device: torch.device("cuda"))
    assert sweep_module.resolve_cohort("auto", "cuda") == 4
    assert sweep_module.resolve_cohort(3, "cuda") == 3


def test_auto_cohort_refuses_a_device_that_is_not_one():
    from opdlab.experiments.sweep import resolve_cohort

    with pytest.raises(UserError, match="bad device 'gpu9'.*allowed: 'auto', 'cpu'"):
        resolve_cohort("auto", "gpu9")


def test_a_sweep_builds_each_task_spec_once_and_loads_its_models_from_it(tmp_path, monkeypatch):
    """The task specs (``base`` with each task's overrides) are built once, by the same code that builds the
    runs, and the models of each task are loaded from that spec; training is stubbed out."""
    from opdlab.config.spec import RunSpec
    from opdlab.experiments import sweep as sweep_module

    real, built, loaded = RunSpec.replace, [], []

    def replace(self, **flat):
        if "task" in flat:
            built.append(flat["task"])
        return real(self, **flat)

    monkeypatch.setattr(RunSpec, "replace", replace)
    monkeypatch.setattr(sweep_module, "load_models", lambda spec, task, runtime: loaded.append(spec) or None)
    monkeypatch.setattr(sweep_module, "_references", lambda spec, task, models, runs_dir: [dict(value=0.0)] * 2)
    monkeypatch.setattr(sweep_module, "_run", lambda group, *args, **kwargs: [(d, None) for _, d in group])
    monkeypatch.setattr(sweep_module, "_finished", lambda *args: [])
    overrides = {"tool_use": {"max_new_tokens": 12}}
    sweep(BASE, ["arithmetic", "tool_use"], ["forward_kl"], ["opd", "opd_plus"], [0, 1], tmp_path / "runs",
          RUNTIME, task_overrides=overrides, workers=1)
    assert built == ["arithmetic", "tool_use"]
    assert loaded == [real(BASE, task="arithmetic"), real(BASE, task="tool_use", max_new_tokens=12)]
