"""A failure that repeats, logged at a limited rate: the first time, then every ``every_n``-th
time or once ``every_s`` seconds have passed since the last line, whichever comes first, each
line saying how many times it happened so far. A success after failures is logged once.

``now`` is an argument (the caller's clock), so the rate does not depend on the wall clock.
"""

from __future__ import annotations

import logging

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """One recurring failure of one thing (a registration, a connection)."""

    def __init__(
        self, logger: logging.Logger, *, every_n: int = 100, every_s: float = 60.0
    ) -> None:
        self.logger = logger
        self.every_n = every_n
        self.every_s = every_s
        self.failures = 0
        """Failures since the last success (or since the start)."""
        self.logged = 0
        """Lines logged for those failures."""
        self._next_at = 0.0

    def failure(self, now: float, message: str, *args: object) -> bool:
        """Count one failure; log ``message % args`` (with the count) when it is due.
        Returns whether a line was logged."""
        self.failures += 1
        due = self.failures == 1 or self.failures % self.every_n == 0 or now >= self._next_at
        if not due:
            return False
        self._next_at = now + self.every_s
        self.logged += 1
        times = "" if self.failures == 1 else f" ({self.failures:,} times so far)"
        self.logger.warning(message + times, *args)
        return True

    def success(self, message: str, *args: object) -> int:
        """The failures end: log ``message % args`` with their count if there were any;
        returns that count and starts over."""
        failures, self.failures, self.logged, self._next_at = self.failures, 0, 0, 0.0
        if failures:
            self.logger.warning(message + f" (after {failures:,} failed attempts)", *args)
        return failures
