"""``UserError``: bad input, said in one line. The CLI turns it (and only it) into ``opdlab CMD: error: ...``
and exit status 2; every other exception is a programming error and keeps its traceback.

A subclass of ``ValueError`` so that callers who catch ``ValueError`` around a bad setting keep working.
Raise it where the input (a parameter, a path, a file a user gave or edited) is wrong, with a message that says
what is wrong and what is allowed; never for a state the code itself should have prevented.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input: the message names the offending value and what is allowed or what to do."""
