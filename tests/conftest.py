"""Shared fixtures. The tests mirror the package folder by folder; a test module may import another's helpers by
module name (``from test_decoder import model_of``) from any folder, and the shared modules here (``runs``,
``rundirs``, ``naive``, ``echo_tool``) from anywhere, so every test folder is on ``sys.path``."""
import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype, restoring the previous default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
