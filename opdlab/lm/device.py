"""Where models run: the device choice and the autocast context, the same for CPU and CUDA."""
from __future__ import annotations

import contextlib

import torch

from opdlab.errors import UserError

__all__ = ["pick_device", "autocast"]


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when present, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` name one. A UserError
    says so when torch does not know the string, or it asks for CUDA (or a CUDA device) this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"bad device {device!r} ({err}); allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return chosen


def autocast(device: torch.device):
    """bf16 autocast on CUDA (where it helps), a no-op context on CPU (fp32 is faster there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
