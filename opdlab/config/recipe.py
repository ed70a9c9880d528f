"""``ModelRecipe``: what determines a task-trained model (architecture, size, SFT schedule), and its hash.

Torch-free, so that ``opdlab.config.spec`` can build recipes without loading torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from opdlab.config.checks import is_int
from opdlab.errors import UserError

__all__ = ["ModelRecipe", "ARCHITECTURES", "SFT_CHECK_EVERY", "SFT_CHECK_N"]

ARCHITECTURES = ("qwen3", "llama")
SFT_CHECK_EVERY = 25  # steps between the accuracy checks of a recipe with an sft_target
SFT_CHECK_N = 128  # training-split examples each check scores (never the held-out examples runs evaluate on)


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
        sft_target: None, or stop supervised training at the first check (every ``SFT_CHECK_EVERY`` steps)
            whose greedy accuracy on ``SFT_CHECK_N`` training-split examples reaches this value; ``sft_steps``
            is then the most it may take. For warm-up students: a short warm-up sits on the steep part of the
            learning curve, where the accuracy reached after a fixed number of steps varies with the machine's
            floating-point summation order; a target fixes where the student starts.
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
    sft_target: float | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise UserError(f"unknown architecture {self.arch!r}; allowed: {', '.join(ARCHITECTURES)}")
        for name in ("hidden", "layers", "heads", "intermediate", "sft_batch", "max_len"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden % self.heads:
            raise UserError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise UserError(f"hidden / heads ({self.hidden} / {self.heads}) must be even: rotary position embeddings "
                            "turn pairs of dimensions")
        for name in ("sft_steps", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.sft_lr, (int, float)) and self.sft_lr > 0):
            raise UserError(f"sft_lr must be a positive number, got {self.sft_lr!r}")
        if self.sft_target is not None and not (isinstance(self.sft_target, (int, float))
                                                and not isinstance(self.sft_target, bool) and 0 < self.sft_target <= 1):
            raise UserError(f"sft_target must be None or an accuracy in (0, 1], got {self.sft_target!r}")

    def key(self, task_name: str, alphabet: str) -> str:
        """A short hash of the recipe, the task and its alphabet, naming the cache entry."""
        fields = asdict(self)
        if fields["sft_target"] is None:  # recipes without a target keep the keys they always had
            del fields["sft_target"]
        blob = json.dumps([fields, task_name, alphabet, None, 1], sort_keys=True)  # None, 1: the format
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
