"""Finding processes a test run left behind."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["live_children"]


def live_children(parent: int | None = None) -> list[tuple[int, str]]:
    """Non-zombie processes whose parent is ``parent`` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name is in parentheses and may itself hold spaces or parentheses.
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            found.append((int(stat.parent.name), name))
    return found
