"""Plain-text output of the client commands: aligned tables, ages, short ids, sizes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

from schemas.clock import utc_now

__all__ = ["ID_PREFIX", "age", "human_bytes", "parse_time", "render_table", "short_id"]

#: How much of an id `ps` shows; any unique prefix is accepted back.
ID_PREFIX: Final = 12
_GAP: Final = "  "
_FRACTION: Final = re.compile(r"(\.\d{6})\d+")


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, the header first, no trailing blanks."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        _GAP.join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp (``Z`` or an offset; Go's nanoseconds are cut to micro)."""
    value = datetime.fromisoformat(_FRACTION.sub(r"\1", text))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def age(then: datetime | str | None, now: datetime | None = None) -> str:
    """How long ago, in the largest whole unit: ``42s``, ``5m``, ``3h``, ``2d``; ``-`` for
    no time, and ``0s`` for a clock a little ahead of ours."""
    if then is None or then == "":
        return "-"
    when = parse_time(then) if isinstance(then, str) else then
    seconds = int(((now or utc_now()) - when).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable")


def short_id(instance_id: str) -> str:
    return instance_id[:ID_PREFIX]


def human_bytes(n: int | None) -> str:
    """Binary units, as the API's size strings mean them: ``512MB``, ``1.5GB``, ``24GB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            if unit == "B" or value >= 10 or value.is_integer():
                return f"{value:.0f}{unit}"
            return f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
