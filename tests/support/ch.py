"""Driving the Cloud Hypervisor API double (ch_double.py) from tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.support.processes import live_children

__all__ = ["DOUBLE", "DOUBLE_KNOBS", "RequestLog", "double_processes", "sockets_in"]

#: The double under the real binary's name (a wrapper script around ch_double.py).
DOUBLE = Path(__file__).parent / "bin" / "cloud-hypervisor"
#: Environment variables that change what the double does (see ch_double.py).
DOUBLE_KNOBS = (
    "CH_DOUBLE_FAIL",
    "CH_DOUBLE_NO_SOCKET",
    "CH_DOUBLE_KVM",
    "CH_DOUBLE_HANG",
    "CH_DOUBLE_VERSION",
)


class RequestLog:
    """Every request the double got, in order, with the status it answered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Set by a test that sends bad requests on purpose.
        self.refusals_expected = False

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def calls(self) -> list[str]:
        """``"PUT vm.create"``, ... in the order they came."""
        return [f"{e['method']} {e['endpoint']}" for e in self.entries()]

    def bodies(self, endpoint: str) -> list[Any]:
        return [json.loads(e["body"]) for e in self.entries() if e["endpoint"] == endpoint]

    def refused(self) -> list[dict[str, Any]]:
        """Requests the spec does not allow (4xx): a driver must send none."""
        return [e for e in self.entries() if 400 <= e["status"] < 500]


def double_processes() -> list[tuple[int, str]]:
    """Doubles still running as children of this process."""
    found = []
    for pid, name in live_children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ch_double.py" in cmdline:
            found.append((pid, name))
    return found


def sockets_in(directory: Path) -> list[str]:
    """What a VMM could leave behind in a run directory: sockets and links."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_socket() or os.path.islink(p))
