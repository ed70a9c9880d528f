"""Teacher and student language models: a character-level tokenizer, models built from a transformers config,
supervised training on a task, and a disk cache keyed by the recipe.

The embedded tasks are learnt from scratch, so both models are small transformers (Qwen3 or Llama
architecture) built from a config, sharing one character-level tokenizer made with the ``tokenizers`` library
and saved beside each model, so ``save_pretrained`` / ``from_pretrained`` round-trip. A pretrained checkpoint
directory (with its own tokenizer) loads with ``load_model`` instead.

A sequence is ``prompt + target + <eos>``. Supervised fine-tuning (SFT) minimises the cross-entropy of the
target tokens only: prompt tokens and environment tokens (tool results, which the model never produces)
carry loss mask 0, exactly as in distillation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = [
    "ModelRecipe", "char_tokenizer", "build_model", "load_model", "save_model", "check_compatible",
    "check_task_tokenizer", "encode_example", "collate", "sft", "cached_model", "teacher_and_student",
    "cache_dir", "pick_device", "count_parameters",
]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ARCHITECTURES = ("qwen3", "llama")


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that determines a supervised model: architecture, size and its SFT schedule.

    Its hash names the cache directory, so a recipe is trained once per machine.

    Attributes:
        arch: ``"qwen3"`` or ``"llama"``.
        hidden: width of the residual stream.
        layers: number of transformer blocks.
        heads: attention heads (key/value heads are the same number).
        intermediate: width of the MLP.
        sft_steps: optimizer steps of supervised training on the task's train split.
        sft_batch: sequences per SFT step.
        sft_lr: peak AdamW learning rate (linear warm-up over 5% of steps, cosine decay to 10%).
        seed: initialisation and data-order seed.
        max_len: maximum sequence length (position embeddings).
    """

    arch: str = "qwen3"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    seed: int = 0
    max_len: int = 256

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; allowed: {', '.join(ARCHITECTURES)}")
        from opdlab.tasks.base import is_int

        for name in ("hidden", "layers", "heads", "intermediate", "sft_batch", "max_len"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("sft_steps", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.sft_lr, (int, float)) and self.sft_lr > 0):
            raise ValueError(f"sft_lr must be a positive number, got {self.sft_lr!r}")

    def key(self, task_name: str, alphabet: str) -> str:
        """A short hash of the recipe, the task and its alphabet, naming the cache entry."""
        blob = json.dumps([asdict(self), task_name, alphabet, None, 1], sort_keys=True)  # None, 1: the format
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where trained teachers and warm-up students live: ``path``, else $OPDLAB_CACHE, else ~/.cache/opdlab."""
    path = path or os.environ.get("OPDLAB_CACHE") or Path.home() / ".cache" / "opdlab"
    return Path(path)


def char_tokenizer(alphabet: str):
    """A character-level ``PreTrainedTokenizerFast``: ids 0, 1, 2 are <pad>, <eos>, <unk>, then one id per
    character of ``alphabet`` in sorted order. A BPE model with no merges splits text into characters and a
    Fuse decoder joins them back, so ``decode(encode(s)) == s`` for any s over the alphabet."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in sorted(set(alphabet)):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left")


def build_model(recipe: ModelRecipe, tokenizer):
    """A randomly initialised causal LM of ``recipe``'s architecture over ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        recipe.arch, vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads, head_dim=recipe.hidden // recipe.heads,
        intermediate_size=recipe.intermediate, max_position_embeddings=recipe.max_len, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(recipe.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def count_parameters(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_model(model, tokenizer, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """``save_pretrained`` the model and its tokenizer into one directory (plus an optional meta.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_progress():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if meta is not None:
        (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


@contextlib.contextmanager
def quiet_progress():
    """Silence transformers' per-save and per-load progress bars (a checkpoint every few steps, or a model
    loaded per run, would flood the output)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` from a local checkpoint directory (``from_pretrained``, no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model checkpoint at {path} (expected a config.json from save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer


def check_compatible(teacher, student, teacher_tokenizer, student_tokenizer) -> None:
    """Raise a ValueError unless teacher and student share a tokenizer and a vocabulary.

    OPD compares pi_T(y_t|c_t) and pi_theta(y_t|c_t) for the same token ids, so both models must read and
    write the same token ids: the same vocabulary (token -> id map) and output heads of the same size.
    """
    v_t, v_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if v_t != v_s:
        only_t, only_s = sorted(set(v_t) - set(v_s))[:5], sorted(set(v_s) - set(v_t))[:5]
        raise ValueError(
            f"teacher and student tokenizers differ ({len(v_t)} vs {len(v_s)} tokens; only in the teacher: "
            f"{only_t}, only in the student: {only_s}, or the same tokens with other ids); on-policy "
            "distillation needs one shared tokenizer")
    n_t, n_s = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if n_t != n_s:
        raise ValueError(f"teacher and student vocabularies differ: output heads of {n_t} and {n_s} tokens; "
                         "on-policy distillation needs one shared vocabulary")


def check_task_tokenizer(model, tokenizer, task, path) -> None:
    """Raise a ValueError unless ``tokenizer`` can write every character of ``task.alphabet`` (none becomes
    <unk>) and every token id it can produce has a row in the model's embedding. ``path`` names the checkpoint
    in the message. Tasks for pretrained tokenizers have an empty alphabet and always pass."""
    alphabet = getattr(task, "alphabet", "") or ""
    encoded = {ch: tokenizer.encode(ch, add_special_tokens=False) for ch in alphabet}
    missing = [ch for ch, ids in encoded.items() if not ids or tokenizer.unk_token_id in ids]
    if missing:
        raise ValueError(f"the tokenizer of {path} cannot encode {len(missing)} of the {len(alphabet)} "
                         f"characters of task {task.name!r} ({''.join(missing)!r}); was it trained on another "
                         "task?")
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:
        raise ValueError(f"the tokenizer of {path} has {len(tokenizer)} tokens but the model embeds only "
                         f"{n_rows}; they do not belong together")


def encode_example(tokenizer, example) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of ``prompt + target + <eos>``. The loss mask is 1 on the target tokens the model
    writes and on <eos>, 0 on the prompt and on environment segments (tool results)."""
    ids = tokenizer.encode(example.prompt, add_special_tokens=False)
    mask = [0] * len(ids)
    for text, is_environment in example.target_segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids, mask = ids + seg, mask + [0 if is_environment else 1] * len(seg)
    return ids + [tokenizer.eos_token_id], mask + [1]


def collate(rows: list[list[int]], pad_id: int, left: bool = True) -> torch.Tensor:
    """Pad integer lists to one (B, T) long tensor, on the left (``left=True``) or the right."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            (out[i, T - len(r):] if left else out[i, :len(r)]).copy_(torch.tensor(r))
    return out


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``peak``."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sft_loss(model, ids_BL: torch.Tensor, loss_mask_BL: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the tokens with loss mask 1 (right-padded batch): logits at position t
    predict token t + 1."""
    attention_BL = (ids_BL != pad_id) | (loss_mask_BL > 0)
    logits_BLV = model(input_ids=ids_BL, attention_mask=attention_BL.long()).logits
    nll_BL = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].transpose(1, 2).float(), ids_BL[:, 1:],
                                               reduction="none")
    m = loss_mask_BL[:, 1:].float()
    return (nll_BL * m).sum() / m.sum().clamp_min(1.0)


def sft(model, tokenizer, task, steps: int, batch: int, lr: float, seed: int = 0, desc: str = "SFT",
        progress: bool = True) -> list[float]:
    """Supervised training on ``task``'s train split: AdamW on ``sft_loss``, gradients clipped to norm 1.

    Returns the loss per step. Training examples are drawn once, ``steps * batch`` of them (at most 50,000,
    then cycled in a seeded order).
    """
    device = next(model.parameters()).device
    pool = task.examples("train", min(steps * batch, 50_000), seed=seed)
    encoded = [encode_example(tokenizer, ex) for ex in pool]
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses, model = [], model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        rows = [encoded[order[(step * batch + i) % len(order)]] for i in range(batch)]
        ids = collate([r[0] for r in rows], tokenizer.pad_token_id, left=False).to(device)
        mask = collate([r[1] for r in rows], 0, left=False).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        with autocast(device):
            loss = sft_loss(model, ids, mask, tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def autocast(device: torch.device):
    """bf16 autocast on CUDA (where it helps), a no-op context on CPU (fp32 is faster there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cached_model(task, recipe: ModelRecipe, role: str, device: str | torch.device = "auto",
                 cache: str | os.PathLike | None = None, eval_n: int = 200, progress: bool = True):
    """``(model, tokenizer, meta)``: the model of ``recipe`` trained on ``task``, from the cache if it is there.

    On a miss the model is built, trained with ``sft`` for ``recipe.sft_steps`` steps, scored on ``eval_n``
    held-out examples with greedy decoding (``meta["greedy_accuracy"]``), and saved under
    ``cache_dir(cache)/<role>-<task>-<hash of recipe>``, so each recipe is trained once per machine.
    """
    from opdlab.rollout import greedy_accuracy

    device = pick_device(device) if isinstance(device, str) else device
    name = getattr(task, "name", type(task).__name__)
    if not getattr(task, "alphabet", ""):
        raise ValueError(f"task {name!r} is meant for a pretrained model's tokenizer (it has no character "
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
                 desc=f"{role} SFT ({name})", progress=progress)
    examples = task.examples("test", eval_n, seed=recipe.seed + 10_000)
    meta = dict(role=role, task=name, recipe=asdict(recipe), parameters=count_parameters(model),
                final_sft_loss=losses[-1] if losses else None,
                greedy_accuracy=greedy_accuracy(model.eval(), tokenizer, task, examples))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_model(model, tokenizer, tmp, meta)
    if not path.exists():
        os.replace(tmp, path)
    return model, tokenizer, meta


def teacher_and_student(task, teacher: ModelRecipe, student: ModelRecipe, device="auto", cache=None,
                        progress: bool = True):
    """The cached teacher and warm-up student for ``task``: ``(teacher, student, tokenizer, meta)`` with
    ``meta = {"teacher": ..., "student": ...}`` (sizes, recipes, held-out greedy accuracies)."""
    t_model, t_tok, t_meta = cached_model(task, teacher, "teacher", device, cache, progress=progress)
    s_model, s_tok, s_meta = cached_model(task, student, "student", device, cache, progress=progress)
    check_compatible(t_model, s_model, t_tok, s_tok)
    return t_model.eval(), s_model, t_tok, {"teacher": t_meta, "student": s_meta}
