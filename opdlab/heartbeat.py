"""Plain progress lines during long phases, at most ``EVERY`` seconds apart.

``opdlab notebooks`` streams the lines a notebook prints while its progress bars stay inside the notebook, so
a phase that runs for minutes (supervised training of a teacher, a pool of OPD runs) would otherwise show
nothing between its first and its last line. Such a phase calls ``Heartbeat.beat`` often (every SFT step,
every OPD step, every wake-up of the sweep's wait); a line is printed when ``every`` seconds have passed since
the last one, so the console never stays silent for longer than ``every`` plus one step.
"""
from __future__ import annotations

import time
from typing import Callable

from opdlab.errors import UserError

__all__ = ["EVERY", "Heartbeat"]

EVERY = 20.0
"""Seconds between two lines: below the 30 s a watcher of ``make figures`` should wait at most."""


class Heartbeat:
    """``beat(message)`` prints ``message()`` (a callable, so that nothing is formatted between lines) when
    ``every`` seconds (default ``EVERY``) have passed since the last line; ``reset()`` after printing a line
    of one's own. Disabled (``enabled=False``), it never prints."""

    def __init__(self, enabled: bool = True, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        every = EVERY if every is None else every
        if isinstance(every, bool) or not (isinstance(every, (int, float)) and every >= 0):
            raise UserError(f"every must be a number of seconds >= 0, got {every!r}")
        self.enabled, self.every, self.clock = enabled, float(every), clock
        self.last = clock()

    def remaining(self) -> float:
        """Seconds until the next line is due (0 when it is), for a wait that should wake up to print it."""
        return max(0.0, self.every - (self.clock() - self.last))

    def reset(self) -> None:
        self.last = self.clock()

    def beat(self, message: Callable[[], str]) -> bool:
        """Print ``message()`` if a line is due; return whether one was printed."""
        if not self.enabled or self.remaining() > 0:
            return False
        print(message(), flush=True)
        self.reset()
        return True
