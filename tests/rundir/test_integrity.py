"""Everything opdlab reads back is verified: checkpoints (resume, eval) and cache entries (teachers, warm-up
students) against the digests written with them; what an older opdlab wrote keeps working; each remedy a
message gives is followed here and shown to work."""
import json
import os
import shutil

import pytest
import torch

from opdlab.app import cli
from opdlab.config.recipe import ModelRecipe
from opdlab.errors import UserError
from opdlab.files import DigestMismatch, check_digest, write_digest
from opdlab.lm import cache
from opdlab.lm.modeling import load_model, save_model, weights_digest
from opdlab.training.loop import train
from rundirs import CLI_FIELDS, CONFIG, MODELS, RT, TASK, TOK, cut, metrics, tiny
from runs import make, resign


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train(CONFIG, run_dir, RT, TASK, MODELS)
    return metrics(run_dir)


def flip_weight(path, name="model.embed_tokens.weight"):
    """Flip the lowest mantissa bit of a float32 in the middle of tensor ``name`` in a safetensors file: every value
    stays finite and nothing but a digest can tell."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + n])[name]["data_offsets"]
    start = 8 + n + (begin + end) // 2 // 4 * 4  # a value in the middle (row 0 is the padding token's, zeros)
    data[start] ^= 1  # little-endian: the first byte holds the lowest bits of the mantissa
    path.write_bytes(bytes(data))


# -- checkpoints -----------------------------------------------------------------------------------------------
def test_a_checkpoint_with_finite_flipped_weights_is_refused_on_resume_and_eval(tmp_path, full, capsys):
    run_dir = cut(tmp_path)
    ckpt = run_dir / "checkpoint"
    saved = weights_digest(load_model(ckpt)[0])
    flip_weight(ckpt / "model.safetensors")
    shutil.copytree(ckpt, tmp_path / "unchecked")
    (tmp_path / "unchecked" / "digest.json").unlink()
    # counterfactual: without its digest the damaged checkpoint loads silently, finite, with other weights
    damaged = load_model(tmp_path / "unchecked")[0]
    assert all(torch.isfinite(p).all() for p in damaged.parameters())
    assert weights_digest(damaged) != saved
    with pytest.raises(UserError, match=r"checkpoint does not match the digest .*\(model.safetensors changed"):
        train(CONFIG, run_dir, RT, TASK, MODELS)
    assert cli.main(["eval", str(run_dir), "--task", "arithmetic", "--device", "cpu", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors changed" in err and str(ckpt) in err
    # the advice: delete it to start the run over from step 0; the run then ends as an uninterrupted one
    shutil.rmtree(ckpt)
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert metrics(run_dir).equals(full)


def test_a_checkpoint_whose_state_was_changed_or_whose_digest_was_lost_is_refused(tmp_path):
    run_dir = cut(tmp_path)
    state_path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    torch.save({**state, "step": 3}, state_path)  # a valid file, other contents
    with pytest.raises(UserError, match=r"state.pt changed"):
        train(CONFIG, run_dir, RT, TASK, MODELS)
    torch.save(state, state_path)
    (run_dir / "checkpoint" / "digest.json").unlink()
    with pytest.raises(UserError, match=r"has lost its digest.json \(it was written with one\)"):
        train(CONFIG, run_dir, RT, TASK, MODELS)


def test_a_checkpoint_written_before_digests_gets_one_on_first_load(tmp_path, full, capsys):
    run_dir = cut(tmp_path)
    state_path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state.pop("digested")
    torch.save(state, state_path)
    (run_dir / "checkpoint" / "digest.json").unlink()
    train(CONFIG, run_dir, RT, TASK, MODELS, stop_after=3)  # loads it, records, stops at once
    assert "was written before checkpoints carried a digest; recorded its digest now" in capsys.readouterr().err
    record = check_digest(run_dir / "checkpoint")
    assert record["recorded"] == "on first load" and "state.pt" in record["files"]
    flip_weight(run_dir / "checkpoint" / "model.safetensors")  # from now on it is verified
    with pytest.raises(UserError, match="model.safetensors changed"):
        train(CONFIG, run_dir, RT, TASK, MODELS)


def test_metric_records_before_the_checkpoint_are_verified_on_resume(tmp_path, full):
    def edit(run_dir):  # a number of step 1's record changed by hand, the line still valid JSON
        lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
        i = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == 1)
        lines[i] = json.dumps({**json.loads(lines[i]), "loss": 123.0}) + "\n"
        (run_dir / "metrics.jsonl").write_text("".join(lines))

    run_dir = cut(tmp_path / "a")
    edit(run_dir)
    with pytest.raises(UserError, match=r"metrics.jsonl: its records of steps 0..2 are not the ones the checkpoint"):
        train(CONFIG, run_dir, RT, TASK, MODELS)
    shutil.rmtree(run_dir / "checkpoint")  # the advice
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert metrics(run_dir).equals(full)
    # counterfactual: a checkpoint without the records' digest (as before it existed) keeps the edit silently
    run_dir = cut(tmp_path / "b")
    state_path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    state.pop("metrics_sha256")
    torch.save(state, state_path)
    resign(run_dir / "checkpoint")
    edit(run_dir)
    train(CONFIG, run_dir, RT, TASK, MODELS)
    assert not metrics(run_dir).equals(full)


def test_every_saved_model_is_verified_where_it_is_loaded(tmp_path):
    save_model(tiny(0), TOK, tmp_path / "m")
    record = check_digest(tmp_path / "m")
    assert record["weights"] == weights_digest(load_model(tmp_path / "m")[0])
    (tmp_path / "m" / "config.json").write_text((tmp_path / "m" / "config.json").read_text() + " ")
    with pytest.raises(DigestMismatch, match=r"config.json changed") as err:
        load_model(tmp_path / "m")
    assert isinstance(err.value, UserError) and err.value.changed == ["config.json"]
    (tmp_path / "m" / "digest.json").write_text("{")
    with pytest.raises(DigestMismatch, match=r"digest.json changed"):
        load_model(tmp_path / "m")


def test_a_run_directory_without_a_checkpoint_is_named_as_such(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(CONFIG, run_dir, RT.replace(checkpoint_every=10), TASK, MODELS, stop_after=1)
    assert not (run_dir / "checkpoint").exists()
    assert cli.main(["eval", str(run_dir), "--task", "arithmetic", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is a run directory without a checkpoint yet" in err and "tokenizer" not in err
    # the advice: resume it; once it has a checkpoint, eval reads it
    train(CONFIG, run_dir, RT.replace(checkpoint_every=10), TASK, MODELS)
    assert cli.main(["eval", str(run_dir), "--task", "arithmetic", "--device", "cpu", "-n", "2",
                     "--samples", "1"]) == 0


# -- the cache of teachers and warm-up students ----------------------------------------------------------------
RECIPE = ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32, sft_steps=3, sft_batch=4, max_len=64)
OTHER = ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32, sft_steps=2, sft_batch=4, max_len=64, seed=1)


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """``get(role, recipe)`` through the cache at tmp_path/cache, counting the supervised trainings."""
    calls = []
    real = cache.sft
    monkeypatch.setattr(cache, "sft", lambda *a, **k: calls.append(1) or real(*a, **k))

    def get(role="teacher", recipe=RECIPE):
        return cache.cached_model(TASK, recipe, role, "cpu", tmp_path / "cache", eval_n=4, progress=False)
    get.calls = calls
    return get


def entry(tmp_path, role="teacher", recipe=RECIPE):
    return tmp_path / "cache" / f"{role}-arithmetic-{recipe.key('arithmetic', TASK.alphabet)}"


def leftovers(tmp_path):
    return [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name or p.name.endswith(".old")]


def test_a_cache_hit_is_verified_and_its_digest_is_the_one_a_run_records(tmp_path, trained):
    model, _, meta = trained()
    again, _, meta2 = trained()
    assert len(trained.calls) == 1 and meta2 == meta
    record = check_digest(entry(tmp_path))
    assert record["weights"] == weights_digest(model) == weights_digest(again)
    assert record["recipe_key"] == RECIPE.key("arithmetic", TASK.alphabet) and "meta.json" in record["files"]
    assert not leftovers(tmp_path)


def test_a_damaged_or_swapped_cache_entry_is_trained_again_and_replaced(tmp_path, trained, capsys):
    teacher, _, _ = trained()
    trained("student", OTHER)
    flip_weight(entry(tmp_path) / "model.safetensors")
    model, _, _ = trained()
    err = capsys.readouterr().err
    assert f"the cached teacher at {entry(tmp_path)} cannot be used, so it is trained again" in err
    assert "model.safetensors changed" in err and len(trained.calls) == 3
    assert weights_digest(model) == weights_digest(teacher)  # the recipe is deterministic on the CPU
    trained()
    assert len(trained.calls) == 3  # replaced: the next run hits
    # the warm-up student's weights copied over the teacher's
    shutil.copy(entry(tmp_path, "student", OTHER) / "model.safetensors", entry(tmp_path) / "model.safetensors")
    trained()
    assert "model.safetensors changed" in capsys.readouterr().err and len(trained.calls) == 4
    # the whole student entry, digest and all, copied over the teacher's: its meta.json names another recipe
    shutil.rmtree(entry(tmp_path))
    shutil.copytree(entry(tmp_path, "student", OTHER), entry(tmp_path))
    trained()
    assert "describes the student of task 'arithmetic' by another recipe" in capsys.readouterr().err
    assert len(trained.calls) == 5 and not leftovers(tmp_path)


def test_a_lost_meta_json_is_restored_without_training(tmp_path, trained, capsys):
    _, _, meta = trained()
    (entry(tmp_path) / "meta.json").unlink()
    _, _, again = trained()
    assert again == meta and len(trained.calls) == 1
    assert "restored the missing" in capsys.readouterr().err
    check_digest(entry(tmp_path))  # restored byte for byte
    (entry(tmp_path) / "meta.json").write_text("{not json")  # damaged rather than lost: trained again
    trained()
    assert "meta.json changed" in capsys.readouterr().err and len(trained.calls) == 2


def test_cache_entries_written_before_digests(tmp_path, trained, capsys):
    _, _, meta = trained()
    (entry(tmp_path) / "digest.json").unlink()  # as an older opdlab wrote it: verified against its recipe
    trained()
    assert "its digest is recorded now" in capsys.readouterr().err and len(trained.calls) == 1
    assert check_digest(entry(tmp_path))["recorded"] == "on first load"
    # an old entry whose meta.json is malformed: named, with the cache entry, and trained again once
    (entry(tmp_path) / "digest.json").unlink()
    (entry(tmp_path) / "meta.json").write_text("{")
    trained()
    err = capsys.readouterr().err
    assert f"{entry(tmp_path) / 'meta.json'} is not valid JSON" in err and len(trained.calls) == 2
    # an old entry that lost its meta.json (once retrained on every run): trained again once, then a hit
    (entry(tmp_path) / "digest.json").unlink()
    (entry(tmp_path) / "meta.json").unlink()
    trained()
    trained()
    assert len(trained.calls) == 3 and not leftovers(tmp_path)


def test_orphaned_temporary_entries_of_dead_processes_are_removed(tmp_path, trained):
    (tmp_path / "cache").mkdir()
    dead = entry(tmp_path).with_name(entry(tmp_path).name + ".tmp999999999")
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    trained()
    assert not dead.exists() and not leftovers(tmp_path)


def test_digests_record_facts_and_refuse_a_file_that_went_missing(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    write_digest(tmp_path / "d", note=1)
    assert check_digest(tmp_path / "d")["note"] == 1
    (tmp_path / "d" / "a.txt").unlink()
    with pytest.raises(DigestMismatch, match="a.txt changed or missing"):
        check_digest(tmp_path / "d")
    assert check_digest(tmp_path / "nothing") is None
    os.makedirs(tmp_path / "e")
    assert json.loads(json.dumps(write_digest(tmp_path / "e")))["files"] == {}


def test_a_runs_fingerprint_records_the_verified_digests_of_its_cached_models(tmp_path, capsys):
    spec, runtime = make(**{**CLI_FIELDS, "steps": 1, "checkpoint_every": 1}, cache=str(tmp_path / "cache"))
    train(spec, tmp_path / "run", runtime, TASK)  # the teacher and the warm-up student trained into the cache
    recorded = json.loads((tmp_path / "run" / "fingerprint.json").read_text())
    entries = {p.name.split("-")[0]: check_digest(p) for p in (tmp_path / "cache").iterdir()}
    assert recorded["teacher"] == entries["teacher"]["weights"] and recorded["student"] == entries["student"]["weights"]
    # a damaged teacher entry is trained again before anything is recorded (the recipe is deterministic on the
    # CPU, so the run's fingerprint still holds), never fingerprinted as it is
    teacher_entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("teacher"))
    flip_weight(teacher_entry / "model.safetensors")
    train(spec, tmp_path / "again", runtime, TASK)
    assert "cannot be used, so it is trained again" in capsys.readouterr().err
    again = json.loads((tmp_path / "again" / "fingerprint.json").read_text())
    assert again["teacher"] == recorded["teacher"] == check_digest(teacher_entry)["weights"]
