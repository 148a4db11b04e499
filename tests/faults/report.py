"""What the fault tests saw, and ``docs/reliability.md`` rendered from it (report mode)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["FAULTS", "OPS", "REPORT", "SEED", "Cell", "Report", "report_enabled"]

#: Every random choice of the fault tests comes from random.Random seeded with this (and
#: the cell's name, so running one cell alone draws what it draws in the full run).
SEED = int(os.environ.get("VMFLEET_FAULT_SEED", "8090"))

FAULTS = ("worker", "gateway", "nats", "qemu")
OPS = ("create", "standby", "restore", "attach", "stop")

_FAULT_NAMES = {
    "worker": "SIGKILL `vmfleet worker` (restarted)",
    "gateway": "SIGKILL `vmfleet gateway` (restarted)",
    "nats": "SIGKILL the nats-server leading the commands stream (restarted)",
    "qemu": "SIGKILL the instance's QEMU (not restarted)",
}

_DOC = Path(__file__).parents[2] / "docs" / "reliability.md"


def report_enabled(option: bool) -> bool:
    return option or os.environ.get("VMFLEET_RELIABILITY_REPORT", "") in ("1", "true", "yes")


@dataclass
class Cell:
    #: Short, for the table ("completed after retry", "refused with 500 ..., consistent").
    outcome: str
    #: How: when the fault landed, the first answer, the retries, the state it ended in.
    detail: str
    passed: bool | None = None
    failure: str | None = None


@dataclass
class Report:
    seed: int = SEED
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    #: Other scenarios ("Disk full", "Stalled registry"): their lines, and whether they passed.
    sections: dict[str, list[str]] = field(default_factory=dict)
    section_passed: dict[str, bool | None] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    command: str = ""

    def render(self) -> str:
        lines = [
            "# Reliability: faults, and how vmfleet converges",
            "",
            "Written by the fault tests' report mode; do not edit by hand. To regenerate it:",
            "",
            "```sh",
            "VMFLEET_RELIABILITY_REPORT=1 VMFLEET_TEST_ASSETS=.cache/test-assets \\",
            "    .venv/bin/pytest tests/faults",
            "```",
            "",
            f"Seed **{self.seed}** (`VMFLEET_FAULT_SEED` overrides it), run of "
            f"{self.started:%Y-%m-%d %H:%M} UTC, on loopback: a 3-node NATS cluster (streams "
            "and buckets at R3), one `vmfleet worker`, one `vmfleet gateway`, each a process of "
            "its own; QEMU guests under TCG (256 MB, 1 vCPU).",
            "",
            "## How each cell runs",
            "",
            "1. The instance is brought, through the API, to the state the operation starts "
            "from (create: none; standby, attach, stop: Running; restore: Standby).",
            "2. The operation is sent over HTTP with an `Idempotency-Key`; the fault is injected "
            "after a delay drawn from the seeded generator, between 10% and 70% of the "
            "operation's duration as measured fault-free on the same stack"
            + (
                " ("
                + ", ".join(f"{op} {s:.1f} s" for op, s in sorted(self.durations.items()))
                + " in this run)"
                if self.durations
                else ""
            )
            + ".",
            "3. The killed component is started again (QEMU is not).",
            "4. The client repeats the call with the same key while the answer is retryable (no "
            "answer, or 5xx with `x-should-retry: true`), as hypeman's SDK does.",
            "5. Convergence, within a bounded wait: no command queued or unacknowledged; every "
            "record of the host stable and matching the host (Running: exactly one live QEMU, "
            "the one in `vmm.pid`; Standby: a snapshot on disk, no QEMU, no socket; Stopped: no "
            "QEMU, no socket, no snapshot); no QEMU, guest directory or volume attachment that "
            "no record accounts for; `/health` and `GET /instances` answer; the effect happened "
            "at most once (one instance of the name, one QEMU, a volume attached once).",
            "",
            "The seed fixes each delay, not the machine's speed, so a fault can land on either "
            "side of a step from one run to the next (QEMU killed just before or just after a "
            "restore resumed the VM, say). The tests accept, per cell, only the outcomes that "
            "are correct for it: with the component restarted, the operation completes, exactly "
            "once; with QEMU killed, it either completes or fails with an error, and a VM whose "
            "QEMU died is recorded `Stopped` with a `state_error` (a failed restore stays in "
            "`Standby`, snapshot kept). A command the killed worker had taken is redelivered "
            "to the restarted worker once the consumer's ack wait (5 s) has passed since the "
            "killed worker's last in-progress beat (sent every second for every command it "
            "held); each cell says how long after the restart its first answer came.",
            "",
            "## Fault x operation",
            "",
            "| fault | " + " | ".join(OPS) + " |",
            "|---|" + "---|" * len(OPS),
        ]
        for fault in FAULTS:
            row = [self._cell_text(fault, op) for op in OPS]
            lines.append(f"| {_FAULT_NAMES[fault]} | " + " | ".join(row) + " |")
        lines += ["", "### What happened in each cell", ""]
        for fault in FAULTS:
            for op in OPS:
                cell = self.cells.get((fault, op))
                if cell is not None:
                    failure = f" **FAILED: {cell.failure}**" if cell.passed is False else ""
                    lines.append(f"- **{fault} x {op}**: {cell.detail}{failure}")
        for title, body in self.sections.items():
            status = {True: "passed", False: "**FAILED**", None: "not finished"}[
                self.section_passed.get(title)
            ]
            lines += ["", f"## {title}", "", *body, "", f"Result: {status}."]
        return "\n".join(lines) + "\n"

    def _cell_text(self, fault: str, op: str) -> str:
        cell = self.cells.get((fault, op))
        if cell is None:
            return "not run"
        if cell.passed is False:
            return f"**FAILED**: {cell.outcome}"
        return cell.outcome

    def write(self) -> Path:
        _DOC.write_text(self.render())
        return _DOC


REPORT = Report()
