"""Causal LMs as ``transformers`` models: built from a ``ModelRecipe``, saved and loaded as local checkpoint
directories (``save_pretrained`` / ``from_pretrained``, no network), with the tokenizer saved beside them.

The embedded tasks are learnt from scratch, so their models are small transformers (Qwen3 or Llama
architecture) built from a config over the character tokenizer of ``opdlab.lm.tokenizer``. A pretrained
checkpoint directory (with its own tokenizer) loads with ``load_model`` the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from opdlab.lm.recipe import ModelRecipe
from opdlab.errors import UserError

__all__ = ["build_model", "count_parameters", "save_model", "load_model", "quiet_progress", "TOKENIZER_FILES"]

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
    hint = (f"; {path} looks like a run directory, its model is in {path / 'checkpoint'}"
            if (path / "checkpoint" / "config.json").exists() else "")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer beside the model at {path} (expected {' or '.join(TOKENIZER_FILES)}, "
                                f"as save_pretrained writes it){hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    except Exception as err:  # transformers, tokenizers and safetensors each raise their own kind
        raise UserError(f"{path} is not a loadable model checkpoint ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0]}){hint}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer
