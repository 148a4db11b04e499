"""What the benchmark scripts share: percentiles, process resources read from /proc, the
machine-readable summary line that `bench/run_all.py` collects, and a `vmfleet dev` stack.

Not a benchmark itself. Every script stays runnable on its own (`python bench/x.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VMFLEET = str(Path(sys.executable).parent / "vmfleet")
ASSETS = Path(os.environ.get("VMFLEET_TEST_ASSETS", ROOT / ".cache" / "test-assets"))
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


# -- a `vmfleet dev` stack -----------------------------------------------------------------------


@dataclass
class DevStack:
    proc: subprocess.Popen[str]
    base_url: str
    token: str
    nats_url: str
    data_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def dev_stack(
    data_dir: Path, port: int, *, host_id: str = "bench-host", env: dict[str, str] | None = None
) -> Iterator[DevStack]:
    """`vmfleet dev` as a child process (as tests/cli/test_dev.py starts it), stopped with
    SIGTERM (which stops its VMs too) when the block ends."""
    full_env = {
        **os.environ,
        "VMFLEET_HOST_ID": host_id,
        "VMFLEET_LOG_LEVEL": "WARNING",
        "VMFLEET_ASSETS_DIR": str(ASSETS),
        **(env or {}),
    }
    full_env.pop("JWT_SECRET", None)
    proc = subprocess.Popen(
        [VMFLEET, "dev", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    try:
        banner = _read_banner(proc, timeout_s=180)
        yield DevStack(
            proc,
            banner["HYPEMAN_BASE_URL"],
            banner["HYPEMAN_API_KEY"],
            banner["NATS"],
            data_dir,
        )
    finally:
        stop_process(proc)


def _read_banner(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, str]:
    banner: dict[str, str] = {}
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            key, _, value = line.strip().removeprefix("export ").partition("=")
            if key.startswith("HYPEMAN_"):
                banner[key] = value
            elif line.strip().startswith("NATS:"):
                banner["NATS"] = line.split(":", 1)[1].strip()
            if "HYPEMAN_API_KEY" in banner:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout_s) or "HYPEMAN_API_KEY" not in banner:
        stop_process(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"vmfleet dev printed no banner; stderr: {err[-2000:]}")
    # stderr is a pipe: drain it, or a chatty stack would block on a full pipe.
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=_drain, args=(stream,), daemon=True).start()
    return banner


def _drain(stream: object) -> None:
    with contextlib.suppress(ValueError, OSError, TypeError):
        for _ in stream:  # type: ignore[attr-defined]
            pass


def stop_process(
    proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float = 90
) -> None:
    """SIGTERM (a daemon stops what it started), then SIGKILL if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
