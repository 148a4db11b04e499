"""The steps of a create, timed, so a user sees where a slow start went.

The record's ``phase_durations_ms`` counts time per lifecycle state (hypeman's meaning);
these are the steps inside a create, which the states do not separate: the image pull,
the disks (overlay, volume overlays, config disk), the VMM's start, the kernel's boot up to
the guest's init, and the rest up to the guest agent's answer. They go into one ops log
line at the end of a create and into a histogram per step on the worker's ``/metrics``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PHASES", "CreatePhases", "init_uptime_s"]

#: The steps in the order a create takes them (the ops log line keeps this order).
#: ``template``: a warm-template start's resume (worker/templates), in place of vmm + boot.
PHASES = ("pull", "disks", "vmm", "template", "boot", "agent")

#: The init's first line on the console: the guest's uptime when the init began.
_INIT_LINE = re.compile(rb"vmfleet init on kernel \S+ at (\d+(?:\.\d+)?)s")
#: The init's first line comes within the first few KiB of the console log.
_HEAD_BYTES = 64 << 10


@dataclass
class CreatePhases:
    """Seconds per step; a step timed twice (disks before and after the pull) adds up."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(phase, time.monotonic() - started)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + max(seconds, 0.0)

    def split_guest_wait(self, waited_s: float, kernel_s: float | None) -> None:
        """The wait from the VMM's start to the agent's answer, split where the guest's
        init began (its uptime then: kernel boot). No init line (an app that ended before,
        a log already rotated): all of it counts as ``agent``."""
        boot = min(kernel_s, waited_s) if kernel_s is not None else 0.0
        self.add("boot", boot)
        self.add("agent", waited_s - boot)

    def milliseconds(self) -> dict[str, int]:
        return {p: round(self.seconds[p] * 1000) for p in PHASES if p in self.seconds}

    def summary(self) -> str:
        """``pull=…ms disks=…ms vmm=…ms boot=…ms agent=…ms``, the steps that were taken."""
        return " ".join(f"{p}={ms}ms" for p, ms in self.milliseconds().items())


def init_uptime_s(console_log: Path) -> float | None:
    """The guest's uptime when its init began, from the init's first console line."""
    try:
        with open(console_log, "rb") as log:
            head = log.read(_HEAD_BYTES)
    except OSError:
        return None
    found = _INIT_LINE.search(head)
    return float(found.group(1)) if found else None
