"""The disk cache of task-trained teachers and warm-up students, keyed by a hash of their recipe.

A miss builds the model, trains it (``opdlab.lm.sft.sft``), scores it on held-out examples and saves it under
``cache_dir(cache)/<role>-<task>-<hash>``, so each recipe is trained once per machine.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from opdlab.heartbeat import Heartbeat
from opdlab.lm.device import pick_device
from opdlab.lm.modeling import build_model, count_parameters, load_model, save_model
from opdlab.lm.recipe import SFT_CHECK_EVERY, SFT_CHECK_N, ModelRecipe
from opdlab.lm.sampling import greedy_accuracy
from opdlab.lm.sft import sft
from opdlab.lm.tokenizer import char_tokenizer, check_compatible
from opdlab.errors import UserError

__all__ = ["cache_dir", "cached_model", "teacher_and_student"]


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
    path = cache_dir(cache) / f"{role}-{name}-{recipe.key(name, task.alphabet)}"
    if (path / "meta.json").exists():
        model, tokenizer = load_model(path, device)
        return model, tokenizer, json.loads((path / "meta.json").read_text())
    tokenizer = char_tokenizer(task.alphabet)
    model = build_model(recipe, tokenizer).to(device)
    if progress:  # a plain line too: `opdlab notebooks` streams it where the notebook's bar does not show
        print(f"training the {role} for {name}: {recipe.sft_steps} SFT steps, {count_parameters(model):,} "
              f"parameters, cached at {path}", flush=True)
    losses = sft(model, tokenizer, task, recipe.sft_steps, recipe.sft_batch, recipe.sft_lr, recipe.seed,
                 desc=f"{role} SFT ({name})", progress=progress, stop=_target_reached(task, tokenizer, recipe),
                 check_every=SFT_CHECK_EVERY, heartbeat=Heartbeat(enabled=progress))
    examples = task.examples("test", eval_n, seed=recipe.seed + 10_000)
    meta = dict(role=role, task=name, recipe=asdict(recipe), parameters=count_parameters(model),
                sft_steps_taken=len(losses), final_sft_loss=losses[-1] if losses else None,
                greedy_accuracy=greedy_accuracy(model.eval(), tokenizer, task, examples))
    if recipe.sft_target is not None and progress:
        print(f"{role} for {name}: stopped after {len(losses)} of {recipe.sft_steps} SFT steps (target "
              f"{recipe.sft_target:g} on training prompts), held-out accuracy {meta['greedy_accuracy']:.2f}", flush=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_model(model, tokenizer, tmp, meta)
    if not path.exists():
        os.replace(tmp, path)
    return model, tokenizer, meta


def _target_reached(task, tokenizer, recipe: ModelRecipe):
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
