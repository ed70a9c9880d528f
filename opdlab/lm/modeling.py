"""Causal LMs as ``transformers`` models: built from a ``ModelRecipe``, saved and loaded as local checkpoint
directories (``save_pretrained`` / ``from_pretrained``, no network), with the tokenizer saved beside them.

The embedded tasks are learnt from scratch, so their models are small transformers (Qwen3 or Llama
architecture) built from a config over the character tokenizer of ``opdlab.lm.tokenizer``. A pretrained
checkpoint directory (with its own tokenizer) loads with ``load_model`` the same way.

Every directory ``save_model`` writes carries a ``digest.json`` (``opdlab.files``): the sha256 of each of its
files and of the model's weights (``weights_digest``). ``load_model`` checks it before loading and the weights'
digest after, and refuses a directory that differs (``files.DigestMismatch``, naming the files); a directory
without one (written by another program, or before digests existed) loads as it is.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import torch

from opdlab.config.recipe import ModelRecipe
from opdlab.errors import UserError
from opdlab.files import DigestMismatch, check_digest, disk_errors, write_digest

__all__ = ["build_model", "count_parameters", "save_model", "load_model", "load_verified", "quiet_progress",
           "TOKENIZER_FILES", "weights_digest", "record_digest", "torch_bytes"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""A checkpoint's tokenizer is one of these (fast tokenizer, sentencepiece model, or a BPE vocabulary)."""


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


def weights_digest(model) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes): the identity of its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def torch_bytes(obj) -> bytes:
    """``torch.save`` of ``obj`` into memory: written to disk by a plain write, a full disk raises an OSError
    (torch's own file writer reports it as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_model(model, tokenizer, path: str | os.PathLike, meta: dict | None = None,
               files: dict[str, bytes] | None = None, facts: dict | None = None) -> Path:
    """``save_pretrained`` the model and its tokenizer into one directory, with an optional meta.json and
    further ``files`` (name -> bytes), then its ``digest.json``: the sha256 of every file, the weights' digest
    and ``facts``. A failed write (a full disk) is an OSError naming ``path``."""
    path = Path(path)
    with disk_errors(path):
        path.mkdir(parents=True, exist_ok=True)
        with quiet_progress():
            model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        if meta is not None:
            (path / "meta.json").write_text(json.dumps(meta, indent=2))
        for name, data in (files or {}).items():
            (path / name).write_bytes(data)
    record_digest(model, path, **(facts or {}))
    return path


def record_digest(model, path: str | os.PathLike, **facts) -> dict:
    """Write ``path``'s digest.json (``files.write_digest``): every file's sha256, the digest and dtype of
    ``model``'s weights, and ``facts``."""
    return write_digest(path, weights=weights_digest(model), dtype=str(next(model.parameters()).dtype), **facts)


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
    """Load ``(model, tokenizer)`` from a local checkpoint directory (``from_pretrained``, no network), checked
    against its ``digest.json`` when it has one (``load_verified``)."""
    return load_verified(path, device, dtype)[:2]


def load_verified(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  what: str = "", remedy: str = ""):
    """``(model, tokenizer, record)``: the checkpoint at ``path`` once its files match their recorded digests
    and (at the saved dtype) its weights match the recorded weights' digest; ``record`` is the directory's
    digest record, None for a directory without one (loaded as it is). A mismatch raises
    ``files.DigestMismatch`` (a UserError) naming the files, ``what`` the directory and ``remedy`` what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model checkpoint at {path} (expected a config.json from save_pretrained)")
    record = check_digest(path, what, remedy)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer beside the model at {path} (expected {' or '.join(TOKENIZER_FILES)}, "
                                "as save_pretrained writes it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    except Exception as err:  # transformers, tokenizers and safetensors each raise their own kind
        raise UserError(f"{path} is not a loadable model checkpoint ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0]})") from None
    same_dtype = record is not None and record.get("dtype") == str(next(model.parameters()).dtype)
    if same_dtype and record.get("weights") not in (None, weights_digest(model)):
        raise DigestMismatch(path, ["the weights as loaded"], what, remedy)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer, record
