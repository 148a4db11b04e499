"""`vmfleet dev` as a child process, for the tests and the benchmarks that need the whole
embedded stack: started with its banner read, stopped with SIGTERM (which stops its VMs
too), SIGKILL only if it does not go in time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ASSETS", "VMFLEET", "DevStack", "dev_stack", "stop_process"]

VMFLEET = str(Path(sys.executable).parent / "vmfleet")
#: Where `make test` fetched the guest kernel (VMFLEET_TEST_ASSETS overrides it).
ASSETS = Path(
    os.environ.get("VMFLEET_TEST_ASSETS", Path(__file__).parents[2] / ".cache" / "test-assets")
)


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
    data_dir: Path,
    port: int,
    *,
    host_id: str = "dev-host",
    env: dict[str, str] | None = None,
    banner_timeout_s: float = 90,
) -> Iterator[DevStack]:
    full_env = {
        **os.environ,
        "VMFLEET_HOST_ID": host_id,
        "VMFLEET_LOG_LEVEL": "WARNING",
        "VMFLEET_TEMPLATES": "off",  # no background template builds in tests
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
        banner = _read_banner(proc, banner_timeout_s)
        yield DevStack(
            proc, banner["HYPEMAN_BASE_URL"], banner["HYPEMAN_API_KEY"], banner["NATS"], data_dir
        )
    finally:
        stop_process(proc)


def stop_process(
    proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float = 90
) -> None:
    """SIGTERM first: a SIGKILLed daemon could not stop the processes it started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


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
        raise AssertionError(f"vmfleet dev printed no banner; stderr: {err[-2000:]}")
    # Both are pipes: drain them, or a chatty stack would block on a full pipe.
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=_drain, args=(stream,), daemon=True).start()
    return banner


def _drain(stream: object) -> None:
    with contextlib.suppress(ValueError, OSError, TypeError):
        for _ in stream:  # type: ignore[attr-defined]
            pass
