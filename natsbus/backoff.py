"""Exponential backoff between retries: the one helper for every retry loop of vmfleet.

Why here: gateway and worker both retry (publishing a command, watching the buckets,
publishing a record, reaching a guest's control channel), and ``natsbus`` is the package
both already import without importing each other. Most of those loops retry a NATS call;
the helper itself knows nothing of NATS, so a loop around anything else (a guest channel)
uses it as well.

A loop keeps its own policy — which errors are worth a retry, for how long (an
``anyio.move_on_after``/``fail_after`` around it), what to log — and asks this object only
how long to wait::

    backoff = Backoff(first_s=0.1, max_s=1.0)
    while True:
        try:
            return await publish()
        except TRANSIENT as exc:
            log.info("publish failed (%r); again in %.1fs", exc, backoff.delay)
            await backoff.sleep()

``reset()`` after a success starts the next run of failures from ``first_s`` again;
``advance()`` hands out the delay without sleeping (for a loop that waits *longer* for each
attempt instead of pausing between them).
"""

from __future__ import annotations

import anyio

__all__ = ["Backoff"]


class Backoff:
    """Delays of ``first_s``, then ``factor`` times the last one, never more than ``max_s``."""

    def __init__(self, first_s: float, max_s: float, *, factor: float = 2.0) -> None:
        if not 0 < first_s <= max_s or factor < 1:
            raise ValueError(f"bad backoff: first {first_s}s, max {max_s}s, factor {factor}")
        self.first_s = first_s
        self.max_s = max_s
        self.factor = factor
        self._delay = first_s

    @property
    def delay(self) -> float:
        """The delay the next :meth:`sleep` or :meth:`advance` hands out (for log lines)."""
        return self._delay

    def advance(self) -> float:
        """The current delay; the next one grows by ``factor`` up to ``max_s``."""
        current = self._delay
        self._delay = min(current * self.factor, self.max_s)
        return current

    async def sleep(self) -> None:
        """Pause for the current delay, and grow it for next time."""
        await anyio.sleep(self.advance())

    def reset(self) -> None:
        """Back to ``first_s``: the last attempt succeeded."""
        self._delay = self.first_s
