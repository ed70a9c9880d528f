"""A run's models: local checkpoints where the spec names them, else the task-trained teacher and warm-up
student from the cache (``opdlab.lm.cache``, trained on a miss), checked before anything trains."""
from __future__ import annotations

import torch

from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec
from opdlab.errors import UserError
from opdlab.lm.cache import cache_dir, teacher_and_student
from opdlab.lm.modeling import build_model, load_model
from opdlab.lm.tokenizer import char_tokenizer, check_compatible, check_task_tokenizer
from opdlab.rundir import layout
from opdlab.training import distributed
from opdlab.training.step import Models

__all__ = ["load_models", "check_before_training"]


def load_models(spec: RunSpec, task, runtime: Runtime | None = None) -> Models:
    """The run's ``Models``: local checkpoints where the spec names them, else the task-trained teacher and
    warm-up student from the cache (trained on a miss). Under a launcher rank 0 loads them first (training a
    cache miss), then the other ranks, each on its own device."""
    runtime = runtime or Runtime()
    device = distributed.device(runtime.device)
    with distributed.main_first(distributed.join(device)):
        return _load_models(spec, task, device, runtime)


def check_before_training(spec: RunSpec, task, runtime: Runtime) -> None:
    """What can be checked before a teacher or warm-up trains: the cache path is a directory (or can be one), and
    the recipes of the models to be built build (on the meta device: no memory, no time). A ``UserError`` names
    the setting."""
    root = cache_dir(runtime.cache)
    for parent in (root, *root.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cache = {str(root)!r}: {parent} is a file, not a directory; give another cache "
                                "directory (-p cache DIR or $OPDLAB_CACHE)")
            break
    m = spec.models
    roles = [r for r, path in (("teacher", m.teacher_path), ("student", m.student_path)) if path is None]
    if not roles or not hasattr(task, "alphabet"):
        return
    tokenizer = char_tokenizer(task.alphabet)
    for role in roles:
        recipe = m.recipe(role)
        try:
            with torch.device("meta"):
                build_model(recipe, tokenizer)
        except Exception as err:  # transformers and torch each refuse a shape in their own words
            raise UserError(f"the {role} of hidden {recipe.hidden}, {recipe.layers} layers, {recipe.heads} heads "
                            f"cannot be built ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
                            f"change {role}_hidden or {role}_layers") from None


def _load_models(spec: RunSpec, task, device, runtime: Runtime) -> Models:
    m = spec.models
    teacher, student, tokenizer, meta = None, None, None, {}
    check_before_training(spec, task, runtime)
    if m.teacher_path is None or m.student_path is None:
        teacher, student, tokenizer, meta = teacher_and_student(
            task, m.recipe("teacher"), m.recipe("student"), device, runtime.cache, runtime.progress)
    cached_tokenizer = tokenizer
    if m.teacher_path is not None:
        teacher, t_tok = load_model(layout.model_dir(m.teacher_path), device)
        check_task_tokenizer(teacher, t_tok, task, m.teacher_path)
        tokenizer, meta["teacher"] = t_tok, {"path": m.teacher_path}
    if m.student_path is not None:
        student, s_tok = load_model(layout.model_dir(m.student_path), device)
        check_task_tokenizer(student, s_tok, task, m.student_path)
        check_compatible(teacher, student, tokenizer, s_tok)
        meta["student"] = {"path": m.student_path}
    elif m.teacher_path is not None:  # a local teacher beside a cached student: same vocabulary?
        check_compatible(teacher, student, tokenizer, cached_tokenizer)
    return Models(teacher.eval(), student, tokenizer, meta)
