"""Run directories and cache entries written before the package moved into one folder per layer (commit b1aa771,
``tests/fixtures/before_layers``, see its README) still work: a run stopped after 2 of 4 steps resumes from the
old cache to the end and equals the old uninterrupted run, and ``opdlab eval`` and the reader read the old run.

The fixture was made with one thread on a CPU of this machine's class; on this machine the resumed run's numbers
equal the old run's exactly, so every comparison here is exact."""
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from opdlab.app import cli
from opdlab.rundir import layout
from opdlab.rundir.reader import read_items, read_metrics, read_records, results, stored_config, stored_runtime

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "before_layers"
STEPS, STOPPED = 4, 2  # the run's steps, and where the stopped run stopped (its last checkpoint)


def _tree_digest(root: Path) -> str:
    """sha256 over every file under ``root`` (relative names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The fixture copied, and its stopped run resumed to the end by ``opdlab train`` from the copied cache, with
    supervised training made to fail: a cache miss would train a teacher or a warm-up student again."""
    root = tmp_path_factory.mktemp("before_layers") / "fx"
    shutil.copytree(FIXTURE, root)
    cache_before, threads = _tree_digest(root / "cache"), torch.get_num_threads()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached teacher or warm-up student was trained again")

    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr("opdlab.lm.cache.sft", no_training)
            code = cli.main(["train", str(root / "run"), "-p", "cache", str(root / "cache"), "-p", "device", "cpu",
                             "-q"])
    finally:
        torch.set_num_threads(threads)  # the recorded runtime runs with one thread
    assert code == 0
    return root, cache_before


def test_the_fixture_is_as_its_readme_says():
    assert stored_runtime(FIXTURE / "run")["cache"] == "/tmp/fx/cache"  # so the test must name the copied cache
    assert max(r["step"] for r in read_records(FIXTURE / "run" / layout.METRICS)) == STOPPED
    assert max(r["step"] for r in read_records(FIXTURE / "full" / layout.METRICS)) == STEPS
    assert sorted(p.name.split("-")[0] for p in (FIXTURE / "cache").iterdir()) == ["student", "teacher"]


def test_the_resumed_run_uses_the_old_cache_as_it_is(resumed):
    root, cache_before = resumed
    assert _tree_digest(root / "cache") == cache_before


def test_the_resumed_run_keeps_the_old_records_of_steps_0_to_2(resumed):
    root, _ = resumed
    old = read_records(FIXTURE / "run" / layout.METRICS)
    new = read_records(root / "run" / layout.METRICS)
    assert [(r["step"], r["kind"]) for r in old] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    assert new[:len(old)] == old  # read back, wall-clock times included: not computed again
    for step in (0, STOPPED):
        assert layout.items_file(root / "run", step).read_bytes() == layout.items_file(FIXTURE / "run",
                                                                                       step).read_bytes()


def test_the_resumed_run_completes_steps_3_and_4(resumed):
    root, _ = resumed
    records = [(r["step"], r["kind"]) for r in read_records(root / "run" / layout.METRICS)]
    assert records[4:] == [(3, "train"), (4, "train"), (4, "eval")]
    assert [step for step, _ in layout.item_files(root / "run")] == [0, 2, 4]
    state = torch.load(layout.checkpoint_dir(root / "run") / layout.STATE, weights_only=False)
    assert state["step"] == STEPS


def test_the_resumed_run_equals_the_old_uninterrupted_one(resumed):
    root, _ = resumed
    full = FIXTURE / "full"
    pd.testing.assert_frame_equal(read_metrics(root / "run", volatile=False).drop(columns="run"),
                                  read_metrics(full, volatile=False).drop(columns="run"), check_exact=True)
    for step, path in layout.item_files(full):
        assert layout.items_file(root / "run", step).read_bytes() == path.read_bytes()
    got, want = (torch.load(layout.checkpoint_dir(d) / layout.STATE, weights_only=False) for d in (root / "run", full))
    assert (layout.checkpoint_dir(root / "run") / "model.safetensors").read_bytes() == \
        (layout.checkpoint_dir(full) / "model.safetensors").read_bytes()
    assert torch.equal(got["rng"]["generator"], want["rng"]["generator"])
    for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got["fingerprint"] == want["fingerprint"]


def test_the_reader_reads_the_old_run():
    full = FIXTURE / "full"
    config = stored_config(full)
    assert config["steps"] == STEPS and config["eval_every"] == STOPPED
    assert stored_runtime(full)["threads"] == 1
    evals = results([full])
    assert list(evals["step"]) == [0, 2, 4] and (evals["run"] == "full").all()
    items = read_items(full)
    assert list(items["step"].unique()) == [0, 2, 4] and len(items) == 3 * config["eval_n"]


def test_opdlab_eval_reads_the_old_run(tmp_path, capsys):
    """``opdlab eval`` on the old run directory loads its verified checkpoint and scores the items of its last
    evaluation: the same prompts, and the same greedy correctness."""
    full, threads = FIXTURE / "full", torch.get_num_threads()
    config = stored_config(full)
    argv = ["eval", str(full), "--task", "arithmetic", "-n", str(config["eval_n"]), "--samples", "1",
            "--max-new-tokens", str(config["max_new_tokens"]), "--device", "cpu", "--csv", str(tmp_path / "e.csv")]
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert str(layout.checkpoint_dir(full)) in capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "e.csv")
    greedy = rows[rows["decoding"] == "greedy"]
    last = pd.read_csv(layout.items_file(full, STEPS))
    assert [hashlib.sha256(p.encode()).hexdigest()[:12] for p in greedy["prompt"]] == list(last["item_id"])
    assert list(greedy["correct"].astype(int)) == list(last["correct"])
