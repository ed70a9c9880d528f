"""A packed forward for scoring rollouts: matrix products over real tokens only, and a prompt shared by
several completions computed once.

Why. ``completion_logits`` scores a rollout laid out as a left-padded prompt then a right-padded completion
(``Rollout.full()``), so the ``transformers`` forward spends its matrix products on every column: at notebook
04's sizes a quarter of them are padding, and each prompt is computed once per completion sampled for it (a
third of the real tokens on arithmetic, four completions per prompt). Teacher scoring and the student's
forward and backward are most of an OPD step, and their cost is those products.

How. The ``N`` distinct real tokens (each distinct prompt once, then every completion's real tokens) form one
``(N, hidden)`` matrix on which every projection, norm and MLP of a Qwen3/Llama block runs (the model's own
weights, no copy, with gradient). Only attention needs rows: keys, values and queries are gathered into a
``(B, H, L, D)`` layout (``Packing.idx_BL``: row b's tokens in order, a prompt token read from its shared
copy), attention runs there with a causal mask over each row's real tokens, and each token's output is read
back from one row (``Packing.src_N``: a shared prompt token from the first row that holds it; its output is
the same in every such row, since a prompt attends only to itself). Gathering is differentiable, so the
gradient of a shared prompt token is the sum over the completions that attend to it, as in the padded
forward. Logits are computed only at the positions asked for.

The arithmetic is that of ``transformers`` in the same order (``opdlab.lm.block``), so the logits agree with the
padded forward to float rounding (``tests/lm/test_packed.py``). Positions count real tokens (``sampling.positions``).
Supported models: those of ``decoder.supports`` whose attention has no dropout active (the packed path applies
none).

Runs. ``stacked_completion_logits(models, rollouts)`` scores R rollouts, rollout r by model r (one architecture
and size), in one forward: each run's packing is padded to the longest run's tokens, rows and row length
(``stack_packings``), every product is one ``torch.bmm`` over runs, and attention runs over all runs' rows at
once. Run r's logits and gradients equal model r's alone to float rounding (``tests/lm/test_block.py``); padded
tokens attend to themselves and are never read.

Supervised training keeps the padded forward: its rows share no prompt and carry little padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opdlab.lm import block, decoder
from opdlab.lm.device import autocast

__all__ = ["Packing", "supports", "pack_rollout", "stack_packings", "hidden", "logits_at", "completion_logits",
           "stacked_completion_logits"]


def supports(model) -> bool:
    """True where the packed forward reproduces ``model``'s: ``decoder.supports(model)`` and no attention
    dropout in training mode."""
    return decoder.supports(model) and not (model.training and getattr(model.config, "attention_dropout", 0.0))


@dataclass
class Packing:
    """Distinct real tokens and where each row finds them; stacked over runs (``stack_packings``), every field
    has a leading run dimension.

    Attributes:
        ids_N, pos_N: the packed tokens and their positions (real tokens before them in their row).
        idx_BL: for row b, the packed index of its l-th real token (0 where l is past the row's end).
        valid_BL: True where row b has an l-th real token.
        src_N: flat index ``b * L + l`` of the row position each packed token's attention output is read from.
    """

    ids_N: torch.Tensor
    pos_N: torch.Tensor
    idx_BL: torch.Tensor
    valid_BL: torch.Tensor
    src_N: torch.Tensor


def pack_rollout(rollout) -> tuple[Packing, torch.Tensor]:
    """The packing of ``Rollout.full()`` with each distinct prompt once, and ``at_BT``: the packed index of
    the token whose logits predict completion token t of row b (the prompt's last token for t = 0, else
    completion token t - 1; the prompt's last token again past the row's end, where nothing is scored)."""
    prompt_BP, completion_BT = rollout.prompt_ids_BP, rollout.completion_ids_BT
    device, (B, T) = prompt_BP.device, completion_BT.shape
    key_BP = torch.where(rollout.prompt_attention_BP.bool(), prompt_BP, -1)
    distinct_UP, u_B = torch.unique(key_BP, dim=0, return_inverse=True)
    real_UP, real_BT = distinct_UP >= 0, rollout.attention_BT.bool()
    p_U, c_B = real_UP.sum(1), real_BT.sum(1)
    first_U = torch.full((len(p_U),), B, dtype=torch.long, device=device).scatter_reduce_(
        0, u_B, torch.arange(B, device=device), "amin")
    N_p = int(p_U.sum())
    start_U, start_B = p_U.cumsum(0) - p_U, N_p + c_B.cumsum(0) - c_B
    p_B = p_U[u_B]
    L = int((p_B + c_B).max())
    l_L = torch.arange(L, device=device)[None]
    valid_BL = l_L < (p_B + c_B)[:, None]
    idx_BL = torch.where(l_L < p_B[:, None], start_U[u_B][:, None] + l_L, start_B[:, None] + l_L - p_B[:, None])
    idx_BL = torch.where(valid_BL, idx_BL, 0)
    rank_UP, t_BT = real_UP.long().cumsum(1) - 1, torch.arange(T, device=device)[None].expand(B, T)
    pos_N = torch.cat([rank_UP[real_UP], (p_B[:, None] + t_BT)[real_BT]])
    src_N = torch.cat([(first_U[:, None] * L + rank_UP)[real_UP], (torch.arange(B, device=device)[:, None] * L
                                                                    + p_B[:, None] + t_BT)[real_BT]])
    ids_N = torch.cat([distinct_UP[real_UP], completion_BT[real_BT]])
    last_B = (start_U + p_U - 1)[u_B]
    at_BT = torch.where((t_BT >= 1) & (t_BT < c_B[:, None]), start_B[:, None] + t_BT - 1, last_B[:, None])
    return Packing(ids_N, pos_N, idx_BL, valid_BL, src_N), at_BT


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` (rows of ``x`` at indices of any shape) by ``index_select``, whose backward is an ``index_add``:
    on CPU it sums a repeated row's gradients in index order, as the backward of ``x[idx]`` (an accumulating
    ``index_put``) does on one thread, at any thread count."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


def stack_packings(packings: list[Packing]) -> Packing:
    """R packings as one with a leading run dimension, each padded to the most tokens, rows and row length of
    any: a padded token is token 0 at position 0 whose output is read from row position 0 and never used; a
    padded row has no real token. One packing is viewed, not copied."""
    if len(packings) == 1:
        p = packings[0]
        return Packing(p.ids_N[None], p.pos_N[None], p.idx_BL[None], p.valid_BL[None], p.src_N[None])
    N = max(len(p.ids_N) for p in packings)
    B, L = max(p.idx_BL.shape[0] for p in packings), max(p.idx_BL.shape[1] for p in packings)

    def pad(x, *size):
        return F.pad(x, [a for n, m in zip(reversed(size), reversed(x.shape)) for a in (0, n - m)])
    # row b, position l sits at b * L + l: recompute src for the wider rows
    src = [(p.src_N // p.idx_BL.shape[1]) * L + p.src_N % p.idx_BL.shape[1] for p in packings]
    return Packing(torch.stack([pad(p.ids_N, N) for p in packings]), torch.stack([pad(p.pos_N, N) for p in packings]),
                   torch.stack([pad(p.idx_BL, B, L) for p in packings]),
                   torch.stack([pad(p.valid_BL, B, L) for p in packings]), torch.stack([pad(s, N) for s in src]))


def _hidden(s: block.Stack, packing: Packing) -> torch.Tensor:
    """The final hidden states (after the last norm) ``(R, N, hidden)`` of a stacked packing, run r by the
    stack's weights r."""
    idx_RBL, (R, B, L), N = packing.idx_BL, packing.idx_BL.shape, packing.ids_N.shape[1]
    H, D = s.H, s.D
    ar_L, run = torch.arange(L, device=idx_RBL.device), torch.arange(R, device=idx_RBL.device)
    # query l of a row sees that row's real keys j <= l; a query past the row's end sees itself only
    mask = ((ar_L[None, :] <= ar_L[:, None])[None] & (packing.valid_BL.flatten(0, 1)[:, None, :] | torch.eye(
        L, dtype=torch.bool, device=idx_RBL.device)[None]))[:, None]
    idx = (idx_RBL + run[:, None, None] * N).flatten(0, 1)  # (R*B, L) into the runs' tokens side by side
    src = packing.src_N + run[:, None] * (B * L)  # (R, N) into the runs' rows side by side

    def attend(i, q, k, v):  # (R, N, heads, D) -> (R, N, H*D)
        o = F.scaled_dot_product_attention(*(_rows(x.flatten(0, 1), idx).transpose(1, 2) for x in (q, k, v)),
                                           attn_mask=mask, scale=s.scale, enable_gqa=s.Hkv != H)
        return _rows(o.transpose(1, 2).reshape(R * B * L, H * D), src)
    h = block.embed(s, packing.ids_N)
    cos, sin = block.rotary(s, h, packing.pos_N)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (R, N, 1, D)
    for i in range(len(s.layers)):
        h = block.layer(s, i, h, cos, sin, attend)
    return block.rms(h, s.norm, s.eps)


def hidden(model, packing: Packing) -> torch.Tensor:
    """The final hidden states (after the model's last norm) of the packed tokens, ``(N, hidden)``, with
    gradient to the model's parameters unless called under ``torch.no_grad()``."""
    return _hidden(block.stack(model), stack_packings([packing]))[0]


def _logits_at(s: block.Stack, h_RN: torch.Tensor, at: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run r's logits at its packed tokens ``at[r]`` (indices of any shape), the output head run once per
    distinct token of each run (runs padded to the most distinct tokens)."""
    R, N = h_RN.shape[:2]
    distinct, where = zip(*(torch.unique(a, return_inverse=True) for a in at))
    U = max(len(d) for d in distinct)
    d_RU = torch.stack([F.pad(d, (0, U - len(d))) for d in distinct]) + torch.arange(R, device=h_RN.device)[:, None] * N
    logits = block.linear(_rows(h_RN.flatten(0, 1), d_RU), s.head, None).flatten(0, 1)  # (R*U, V)
    return [_rows(logits, w + r * U) for r, w in enumerate(where)]


def logits_at(model, h_N: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Logits of the packed tokens ``at`` (any shape of indices), the output head run once per distinct token."""
    return _logits_at(block.stack(model), h_N[None], [at])[0]


def completion_logits(model, rollout) -> torch.Tensor:
    """``sampling.completion_logits`` by the packed forward: ``(B, T, V)`` logits predicting each completion
    token, float32. Past a row's end (mask 0) they are the logits after its prompt, finite and never scored."""
    return stacked_completion_logits([model], [rollout])[0]


def stacked_completion_logits(models: list, rollouts: list) -> list[torch.Tensor]:
    """``completion_logits(models[r], rollouts[r])`` for every r, in one forward of the stacked models
    (``block.stack``: one architecture and size), with gradient to each model's own parameters."""
    packings, at = zip(*(pack_rollout(r) for r in rollouts))
    with autocast(at[0].device):
        s = block.stack(models)
        return [x.float() for x in _logits_at(s, _hidden(s, stack_packings(list(packings))), list(at))]
