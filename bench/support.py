"""What the benchmark scripts share: percentiles, process resources read from /proc, the
machine-readable summary line that `bench/run_all.py` collects, and a `vmfleet dev` stack.

Not a benchmark itself. Every script stays runnable on its own (`python bench/x.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Re-exported: the benchmarks start the stack the way the tests do.
from tests.support.dev import ASSETS as ASSETS  # noqa: E402
from tests.support.dev import VMFLEET as VMFLEET  # noqa: E402
from tests.support.dev import DevStack as DevStack  # noqa: E402
from tests.support.dev import dev_stack as dev_stack  # noqa: E402
from tests.support.dev import stop_process as stop_process  # noqa: E402

#: The prefix of the one line per run that `bench/run_all.py` reads.
JSON_MARK = "BENCH-JSON "


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank below), as bench/gateway.py computes it."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(check: Callable[[], object], timeout_s: float = 120, what: str = "setup") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark {what} did not converge in {timeout_s:g}s")
        time.sleep(0.2)


def cpu_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def settle(busy_below: float = 0.1, window_s: float = 0.1, max_wait_s: float = 5.0) -> None:
    """Until the host's CPUs are idle (busy under ``busy_below`` over ``window_s``), at most
    ``max_wait_s``: a timed boot then does not share the CPUs with the previous round's
    teardown (a VMM's exit, a deleted instance's files written back)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        busy0, total0 = cpu_busy_ticks()
        await anyio.sleep(window_s)
        busy1, total1 = cpu_busy_ticks()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            return


# -- results -----------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of bench/RESULTS.md: a measurement, its same-run baseline, and its goal."""

    metric: str
    result: float | str
    unit: str = ""
    baseline: float | str | None = None
    baseline_name: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    issue: str = ""


@dataclass
class Summary:
    bench: str
    params: dict[str, object] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, result: float | str, **kwargs: object) -> Result:
        row = Result(metric, result, **kwargs)  # type: ignore[arg-type]
        self.results.append(row)
        return row

    def emit(self) -> None:
        """Print the summary as one JSON line (prefixed with JSON_MARK)."""
        payload = {
            "bench": self.bench,
            "params": self.params,
            "results": [asdict(r) for r in self.results],
            "notes": self.notes,
        }
        print(JSON_MARK + json.dumps(payload, default=str), flush=True)


# -- processes ---------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (bytes) and Threads of a process, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
                elif key == "Threads":
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def children_of(pid: int) -> dict[int, str]:
    """Every descendant of ``pid`` (pid -> comm), from /proc; zombies included (see
    :func:`is_zombie`)."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # comm may hold spaces and parentheses: split after its last ")".
        head, _, rest = stat.rpartition(")")
        fields = rest.split()
        child = int(entry.name)
        names[child] = head.partition("(")[2]
        parents.setdefault(int(fields[1]), []).append(child)
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found[child] = names.get(child, "?")
                todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 of stat (utime, stime), counted from after the comm.
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def is_zombie(pid: int) -> bool:
    """Exited but not reaped by its parent (state Z)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (say, a temporary directory of ours)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (sparse files count what they hold, like du)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


# -- a `vmfleet dev` stack: the tests' own launcher (tests/support/dev.py) --------------------


class RawQmp:
    """Blocking QMP for the baselines that run QEMU by hand: no vmfleet code in the way."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        self.file = self.sock.makefile("rwb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: object) -> dict[str, object]:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            reply: dict[str, object] = json.loads(self.file.readline())
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        self.sock.close()
