"""Supervised fine-tuning (SFT) on a task: the cross-entropy of the target tokens only.

Prompt tokens and environment tokens (tool results) carry loss mask 0 (``opdlab.lm.tokenizer.encode_example``).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from opdlab.lm.device import autocast
from opdlab.lm.tokenizer import collate, encode_example

__all__ = ["sft", "sft_loss", "warmup_cosine_lr"]


def warmup_cosine_lr(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``peak``."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sft_loss(model, ids_BL: torch.Tensor, loss_mask_BL: torch.Tensor, pad_id: int,
             attention_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the tokens with loss mask 1 (right-padded batch): logits at position t
    predict token t + 1. ``attention_BL`` marks the real tokens; without it, every token that is not ``pad_id``
    or carries a loss (a pretrained tokenizer may pad with a token its chat template uses: then pass it)."""
    if attention_BL is None:
        attention_BL = (ids_BL != pad_id) | (loss_mask_BL > 0)
    logits_BLV = model(input_ids=ids_BL, attention_mask=attention_BL.long()).logits
    nll_BL = torch.nn.functional.cross_entropy(logits_BLV[:, :-1].transpose(1, 2).float(), ids_BL[:, 1:],
                                               reduction="none")
    m = loss_mask_BL[:, 1:].float()
    return (nll_BL * m).sum() / m.sum().clamp_min(1.0)


def sft(model, tokenizer, task, steps: int, batch: int, lr: float, seed: int = 0, desc: str = "SFT",
        progress: bool = True, stop=None, check_every: int = 25, heartbeat=None) -> list[float]:
    """Supervised training on ``task``'s train split: AdamW on ``sft_loss``, gradients clipped to norm 1.

    ``stop``: None, or a function of the model called every ``check_every`` steps (in eval mode, without
    gradient); training ends after the first call that returns True. The learning-rate schedule is that of
    ``steps`` either way. ``heartbeat``: None, or an ``opdlab.heartbeat.Heartbeat`` that prints a plain line
    (step, loss) at most every ``heartbeat.every`` seconds. Returns the loss per step taken. Training examples
    are drawn once, ``steps * batch`` of them (at most 50,000, or the task's pool for a fixed-pool task, then
    cycled in a seeded order).
    """
    device = next(model.parameters()).device
    pool = task.examples("train", min(steps * batch, 50_000), seed=seed)
    encoded = [encode_example(tokenizer, ex) for ex in pool]
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    losses, model = [], model.train()
    of = f"/{steps}" if stop is None else f" of at most {steps}"  # a target may end training earlier
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        rows = [encoded[order[(step * batch + i) % len(order)]] for i in range(batch)]
        ids = collate([r[0] for r in rows], tokenizer.pad_token_id, left=False).to(device)
        mask = collate([r[1] for r in rows], 0, left=False).to(device)
        attention = collate([[1] * len(r[0]) for r in rows], 0, left=False).to(device)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr)
        with autocast(device):
            loss = sft_loss(model, ids, mask, tokenizer.pad_token_id, attention)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if heartbeat is not None:
            heartbeat.beat(lambda: f"{desc}: step {step + 1}{of}, loss {losses[-1]:.3f}")
        if stop is not None and (step + 1) % check_every == 0:
            with torch.no_grad():
                done = stop(model.eval())
            model.train()
            if done:
                break
    return losses
