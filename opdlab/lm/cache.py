"""The disk cache of task-trained teachers and warm-up students, keyed by a hash of their recipe.

A miss builds the model, trains it (``opdlab.lm.sft.sft``), scores it on held-out examples and saves it under
``cache_dir(cache)/<role>-<task>-<hash>``, so each recipe is trained once per machine.

What is read back is verified. An entry carries a ``digest.json`` (``opdlab.files``): the sha256 of each of its
files (weights, tokenizer, meta.json with the recipe), the digest of the weights, the recipe's key and a copy of
its meta. A hit loads only when the files and weights match it and meta.json names this role, task and recipe;
otherwise the entry is trained again and replaced, with a line on stderr naming the entry and the reason. A
meta.json that is missing is restored from the digest's copy (verified like the rest), not retrained. An entry
written before digests existed is checked against its recipe (meta.json) and gets its digest recorded on first
load. An entry is written into a temporary directory and renamed into place; the temporary directory is removed
whether the write ends or fails (a full disk is an OSError naming the entry), so a failed write leaves the
previous entry as it was.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from opdlab.config.recipe import SFT_CHECK_EVERY, SFT_CHECK_N, ModelRecipe
from opdlab.errors import UserError
from opdlab.files import DIGEST_FILE, disk_errors, remove_tree, replace_dir, write_atomic
from opdlab.heartbeat import Heartbeat
from opdlab.lm.device import pick_device
from opdlab.lm.modeling import build_model, count_parameters, load_verified, record_digest, save_model
from opdlab.lm.sampling import greedy_accuracy
from opdlab.lm.sft import sft
from opdlab.lm.tokenizer import char_tokenizer, check_compatible

__all__ = ["cache_dir", "cached_model", "teacher_and_student", "target_reached"]


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where trained teachers and warm-up students live: ``path``, else $OPDLAB_CACHE, else ~/.cache/opdlab."""
    path = path or os.environ.get("OPDLAB_CACHE") or Path.home() / ".cache" / "opdlab"
    return Path(path)


def cached_model(task, recipe: ModelRecipe, role: str, device: str | torch.device = "auto",
                 cache: str | os.PathLike | None = None, eval_n: int = 200, progress: bool = True):
    """``(model, tokenizer, meta)``: the model of ``recipe`` trained on ``task``, from the cache if it is there.

    On a miss the model is built, trained with ``sft`` for ``recipe.sft_steps`` steps, scored on ``eval_n``
    held-out examples with greedy decoding (``meta["greedy_accuracy"]``), and saved under
    ``cache_dir(cache)/<role>-<task>-<hash of recipe>``, so each recipe is trained once per machine.
    """
    device = pick_device(device) if isinstance(device, str) else device
    name = getattr(task, "name", type(task).__name__)
    if not getattr(task, "alphabet", ""):
        raise UserError(f"task {name!r} is meant for a pretrained model's tokenizer (it has no character "
                         "alphabet to build one from); set teacher_path and student_path to local checkpoints")
    key = recipe.key(name, task.alphabet)
    path = cache_dir(cache) / f"{role}-{name}-{key}"
    found = _load_entry(path, role, name, recipe, key, device)
    if found is not None:
        return found
    tokenizer = char_tokenizer(task.alphabet)
    model = build_model(recipe, tokenizer).to(device)
    if progress:  # a plain line too: `opdlab notebooks` streams it where the notebook's bar does not show
        print(f"training the {role} for {name}: {recipe.sft_steps} SFT steps, {count_parameters(model):,} "
              f"parameters, cached at {path}", flush=True)
    losses = sft(model, tokenizer, task, recipe.sft_steps, recipe.sft_batch, recipe.sft_lr, recipe.seed,
                 desc=f"{role} SFT ({name})", progress=progress, stop=target_reached(task, tokenizer, recipe),
                 check_every=SFT_CHECK_EVERY, heartbeat=Heartbeat(enabled=progress))
    examples = task.examples("test", eval_n, seed=recipe.seed + 10_000)
    meta = dict(role=role, task=name, recipe=asdict(recipe), parameters=count_parameters(model),
                sft_steps_taken=len(losses), final_sft_loss=losses[-1] if losses else None,
                greedy_accuracy=greedy_accuracy(model.eval(), tokenizer, task, examples))
    if recipe.sft_target is not None and progress:
        print(f"{role} for {name}: stopped after {len(losses)} of {recipe.sft_steps} SFT steps (target "
              f"{recipe.sft_target:g} on training prompts), held-out accuracy {meta['greedy_accuracy']:.2f}",
              flush=True)
    return _write_entry(model, tokenizer, meta, path, role, name, recipe, key, device)


def _meta_json(meta: dict) -> str:
    """meta.json's text, as ``save_model`` writes it."""
    return json.dumps(meta, indent=2)


def _say(line: str) -> None:
    print(f"opdlab: {line}", file=sys.stderr, flush=True)


def _meta_problem(path: Path, role: str, name: str, recipe: ModelRecipe) -> tuple[dict | None, str | None]:
    """``(meta, None)`` when ``path/meta.json`` describes ``role`` on task ``name`` by ``recipe``, else
    ``(None, what is wrong)``."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return None, f"it has no {path / 'meta.json'}"
    except ValueError as err:
        return None, f"{path / 'meta.json'} is not valid JSON ({err})"
    if not isinstance(meta, dict):
        return None, f"{path / 'meta.json'} holds no JSON object"
    found = (meta.get("role"), meta.get("task"), meta.get("recipe"))
    if found != (role, name, asdict(recipe)):
        return None, (f"{path / 'meta.json'} describes the {found[0]} of task {found[1]!r} by another recipe "
                      f"than this {role}'s")
    return meta, None


def _restore_meta(path: Path) -> None:
    """Write a missing meta.json back from the copy in the entry's digest.json (checked with the rest after)."""
    try:
        copy = json.loads((path / DIGEST_FILE).read_text()).get("meta_json")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(copy, str) and not (path / "meta.json").exists():
        write_atomic(path / "meta.json", copy)
        _say(f"restored the missing {path / 'meta.json'} from {path / DIGEST_FILE}")


def _load_entry(path: Path, role: str, name: str, recipe: ModelRecipe, key: str, device):
    """``(model, tokenizer, meta)`` of the verified cache entry at ``path``; None for a miss, or for an entry
    that fails its checks (said on stderr: it is then trained again and replaced)."""
    if not path.exists():
        return None
    what = f"the cached {role} at {path}"
    _restore_meta(path)
    try:
        model, tokenizer, record = load_verified(path, device, what=what)
    except (UserError, OSError) as err:
        _say(f"{what} cannot be used, so it is trained again: {err}")
        return None
    meta, problem = _meta_problem(path, role, name, recipe)
    if problem is not None:
        _say(f"{what} cannot be used, so it is trained again: {problem}")
        return None
    if record is None:  # written before entries carried a digest
        record_digest(model, path, recipe_key=key, meta_json=(path / "meta.json").read_text(),
                      recorded="on first load")
        _say(f"{what} was written before cache entries carried a digest; its meta.json matches this recipe, "
             "and its digest is recorded now, from the files as they are")
    return model, tokenizer, meta


def _write_entry(model, tokenizer, meta: dict, path: Path, role, name, recipe, key, device):
    """Save a trained model as the cache entry ``path`` (through a temporary directory, removed however the
    write ends) and return ``(model, tokenizer, meta)``; when another process wrote a good entry meanwhile,
    return that one, so every run of the recipe uses the same weights."""
    _remove_orphans(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with disk_errors(path, rename=True):
            save_model(model, tokenizer, tmp, meta, facts={"recipe_key": key, "meta_json": _meta_json(meta)})
        theirs = _load_entry(path, role, name, recipe, key, device) if path.exists() else None
        if theirs is not None:
            return theirs
        replace_dir(tmp, path)
    finally:
        remove_tree(tmp)
    return model, tokenizer, meta


def _remove_orphans(path: Path) -> None:
    """Remove temporary copies of ``path`` left by processes that were killed while writing it."""
    for orphan in path.parent.glob(path.name + ".tmp*"):
        pid = orphan.name.rpartition(".tmp")[2]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            remove_tree(orphan)
        except PermissionError:  # alive, another user's
            pass


def target_reached(task, tokenizer, recipe: ModelRecipe):
    """The ``stop`` function of a recipe with an ``sft_target`` (None without one): greedy accuracy on
    ``SFT_CHECK_N`` training-split examples (a seed of their own) at least the target."""
    if recipe.sft_target is None:
        return None
    examples = task.examples("train", SFT_CHECK_N, seed=recipe.seed + 20_000)
    return lambda model: greedy_accuracy(model, tokenizer, task, examples) >= recipe.sft_target


def teacher_and_student(task, teacher: ModelRecipe, student: ModelRecipe, device="auto", cache=None,
                        progress: bool = True):
    """The cached teacher and warm-up student for ``task``: ``(teacher, student, tokenizer, meta)`` with
    ``meta = {"teacher": ..., "student": ...}`` (sizes, recipes, held-out greedy accuracies)."""
    t_model, t_tok, t_meta = cached_model(task, teacher, "teacher", device, cache, progress=progress)
    s_model, s_tok, s_meta = cached_model(task, student, "student", device, cache, progress=progress)
    check_compatible(t_model, s_model, t_tok, s_tok)
    return t_model.eval(), s_model, t_tok, {"teacher": t_meta, "student": s_meta}
