"""The one clock of vmfleet's records: timezone-aware UTC, as every ``Timestamp`` on the wire.

Gateway, worker and benchmarks stamp records, events and log lines with :func:`utc_now`
rather than each defining its own ``_now()``, so that one place decides what "now" is (and
a test or a simulated host has one function to stand in for).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_now"]


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
