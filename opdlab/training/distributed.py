"""Data-parallel OPD over several processes (``torchrun`` or ``accelerate launch``), equal to one process.

A launcher starts one process per rank and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them
(``WORLD_SIZE`` unset or 1) opdlab runs in one process exactly as before, and nothing here does anything.
With W > 1 ranks (``World``):

- **Prompts.** Each step has P = ``prompts_per_step`` prompts and G = ``samples_per_prompt`` samples of each:
  a global batch of P·G sequences. Rank r samples the contiguous share of prompts ``[r·P/W, (r+1)·P/W)``, all
  G samples of each, so the leave-one-out baseline's groups and every per-sequence quantity (γ-discounted
  future terms, the expected baseline) are computed as in one process. P must be divisible by W.
- **Reduction.** Rank r's surrogate is ``L_r = S_r / n_r`` (``estimators.reinforce_loss`` and the reference
  losses), S_r the sum of its terms and n_r its unmasked tokens (``reduction="token"``) or sequences
  (``"sequence"``). The one-process loss is ``L = Σ_r S_r / n`` with the *global* count ``n = Σ_r n_r``, so
  each rank backpropagates ``L_r · n_r / n`` (``global_loss``, one all-reduce of n_r) and the gradients are
  summed over ranks (``sum_gradients``): ``Σ_r ∇(L_r n_r / n) = ∇L``. Gradient clipping and the AdamW step
  then run on the same global gradient on every rank, so the ranks' students stay equal.
- **Sampling.** Rank r draws from its own generator, seeded with ``rank_seed(seed, r)``: rank 0 keeps
  ``seed`` and the others get well-mixed seeds that no small seed of another run reuses. A W-rank run
  therefore samples other completions than a one-process run (the same distribution); given the same
  completions its update is the one-process update up to floating-point summation order. Checkpoints carry
  every rank's generator state, and a run resumes only with the world size it started with.
- **Metrics.** Each rank's per-token and per-sequence values are gathered in rank order (``gather``) and the
  step's metrics are computed from them by the one-process code, so they are the global batch's.
- **Writing.** Only rank 0 takes the run directory's lock and writes config, metrics, checkpoints and
  run.json; it evaluates alone (the others go on sampling and wait for it at the next gradient all-reduce).
  Rank 0 loads (or trains into the cache) the models before the other ranks read them.

Backends: NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opdlab.config.choices import REDUCTIONS
from opdlab.errors import UserError
from opdlab.lm.device import pick_device

__all__ = ["World", "world", "device", "join", "rank_seed", "check_share", "share", "global_loss", "sum_gradients",
           "gather", "from_main", "main_first", "TIMEOUT"]

TIMEOUT = datetime.timedelta(hours=1)
"""How long a rank waits in a collective: long enough for rank 0 to train a cache miss or evaluate."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` in [0, size), ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer; a launcher (torchrun, "
                         "accelerate launch) sets RANK, WORLD_SIZE and LOCAL_RANK to integers") from None


def world() -> World:
    """The ranks as the launcher's environment describes them; ``World()`` (one process) without a launcher."""
    size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={size} are inconsistent: expected 0 <= RANK < WORLD_SIZE")
    return World(rank, size, local_rank)


def device(name: str = "auto") -> torch.device:
    """``lm.device.pick_device(name)``, with CUDA pinned to ``cuda:LOCAL_RANK`` when several ranks run."""
    chosen, w = pick_device(name), world()
    if w.size == 1 or chosen.type != "cuda":
        return chosen
    if chosen.index is not None and chosen.index != w.local_rank:
        raise UserError(f"device {name!r} asked for under a launcher with {w.size} ranks, where each rank uses "
                         f"cuda:LOCAL_RANK; use device 'auto' or 'cuda'")
    torch.cuda.set_device(w.local_rank)
    return torch.device("cuda", w.local_rank)


def join(on: torch.device) -> World:
    """Join the launcher's process group (once; left when the process ends): NCCL for CUDA, gloo for CPU."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        if on.type == "cuda":  # object collectives (gather, from_main) use the current device
            torch.cuda.set_device(on)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=on)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return w


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of ``rank``: ``seed`` itself for rank 0 (so one process samples as it always has),
    else 31 bits of sha256 of ``(seed, rank)``, far from the small seeds other runs use."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"opdlab-rank:{seed}:{rank}".encode()).digest()[:4], "big") >> 1


def check_share(prompts_per_step: int, w: World) -> None:
    """Refuse a step's prompts that the ranks cannot share in whole prompts."""
    if prompts_per_step % w.size:
        raise UserError(f"prompts_per_step = {prompts_per_step} cannot be shared by {w.size} processes: it must "
                         f"be a multiple of the number of processes (each samples whole prompts with all their "
                         f"samples), e.g. {w.size * max(1, prompts_per_step // w.size)}; or launch a number of "
                         f"processes that divides {prompts_per_step}")


def share(items: list, w: World) -> list:
    """Rank ``w.rank``'s contiguous share of ``items`` (whose length ``w.size`` divides)."""
    n = len(items) // w.size
    return items[w.rank * n:(w.rank + 1) * n]


def global_loss(loss: torch.Tensor, mask_BT: torch.Tensor, reduction: str, w: World) -> torch.Tensor:
    """``L_r · n_r / n``: rank r's surrogate ``L_r = S_r / n_r`` rescaled to the global denominator
    ``n = Σ_r n_r`` (unmasked tokens for ``"token"``, sequences for ``"sequence"``; at least 1, as in
    ``estimators``), so that summing the ranks' gradients gives the one-process gradient of ``Σ_r S_r / n``.
    The loss itself in one process."""
    if w.size == 1:
        return loss
    if reduction not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    n_r = mask_BT.sum() if reduction == "token" else torch.tensor(float(mask_BT.shape[0]), device=mask_BT.device)
    n = n_r.detach().clone().double()
    dist.all_reduce(n)
    return loss * (n_r.clamp_min(1.0) / n.clamp_min(1.0)).to(loss.dtype)


def sum_gradients(parameters, w: World) -> None:
    """All-reduce (sum) every parameter's gradient over the ranks, in place; parameters without a gradient
    are left so on every rank (the graph is the same everywhere)."""
    if w.size == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def gather(obj, w: World) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (tensors moved to the CPU first); ``[obj]`` in one
    process, untouched."""
    if w.size == 1:
        return [obj]
    obj = _to_cpu(obj)
    out = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def from_main(fn, w: World):
    """``fn()`` run on rank 0 and its result given to every rank; an exception it raises is raised on every
    rank, so a refused start (a locked or foreign run directory) stops all ranks with rank 0's message."""
    if w.size == 1:
        return fn()
    payload = [None]
    if w.is_main:
        try:
            payload = [(True, _to_cpu(fn()))]
        except Exception as err:
            payload = [(False, err)]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise value
    return value


@contextlib.contextmanager
def main_first(w: World):
    """Rank 0 runs the block first (e.g. trains a cache miss and saves it); the others run it after."""
    if w.size > 1 and not w.is_main:
        dist.barrier()
    yield
    if w.size > 1 and w.is_main:
        dist.barrier()
