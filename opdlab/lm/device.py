"""Where models run: the device choice and the autocast context, the same for CPU and CUDA."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["pick_device", "autocast"]


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (where it helps), a no-op context on CPU (fp32 is faster there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
