"""Benchmark tasks: prompts, reference answers, and scorers that never raise.

``get_task(name, **options)`` builds a task by name:

- ``"arithmetic"``: multi-step integer arithmetic written out step by step (embedded; from-scratch models).
- ``"tool_use"``: questions answered by calling a real tool (``add``, ``mul``, ``convert``, ``capital``),
  parsed with ``ast``, executed, and scored like BFCL's AST check (embedded; from-scratch models).
- ``"gsm_symbolic"``: GSM-Symbolic problems from ``reasoning-gym`` with its verifier (pretrained models).
- ``"bfcl_simple"``: BFCL's "simple" category from the data ``bfcl-eval`` ships (pretrained models).

The last two need ``pip install -e .[pretrained]`` (and ``pip install --no-deps bfcl-eval``).
See :mod:`opdlab.tasks.base` for the interface (:class:`Example`, :class:`Score`, :class:`Task`).
"""
from __future__ import annotations

from opdlab.errors import UserError
from opdlab.tasks.base import Example, Score, Task, score_batch, split_of, summarize


def _arithmetic(**options):
    from opdlab.tasks.arithmetic import ArithmeticTask
    return ArithmeticTask(**options)


def _tool_use(**options):
    from opdlab.tasks.tool_use import ToolUseTask
    return ToolUseTask(**options)


def _gsm_symbolic(**options):
    from opdlab.tasks.external import GSMSymbolicTask
    return GSMSymbolicTask(**options)


def _bfcl_simple(**options):
    from opdlab.tasks.external import BFCLSimpleTask
    return BFCLSimpleTask(**options)


_BUILDERS = {"arithmetic": _arithmetic, "tool_use": _tool_use, "gsm_symbolic": _gsm_symbolic,
             "bfcl_simple": _bfcl_simple}

TASK_NAMES = tuple(_BUILDERS)


def get_task(name: str, **options) -> Task:
    """The task called ``name`` built with ``options``.

    Raises UserError for an unknown name (listing :data:`TASK_NAMES`) or for options the task does not take
    or does not accept; ImportError with an install hint when an external task's package is missing.
    """
    if name not in _BUILDERS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    try:
        return _BUILDERS[name](**options)
    except TypeError as err:  # unexpected keyword: say which options exist
        raise UserError(f"bad options for task {name!r}: {err}") from err


__all__ = ["Example", "Score", "Task", "TASK_NAMES", "get_task", "score_batch", "split_of", "summarize"]
