"""A real `vmfleet gateway` process on a loopback port, so tests can SIGKILL and restart it."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from cli.embedded_nats import free_port
from tests.support.fleet import VMFLEET
from tests.support.gateway import SECRET, mint

__all__ = ["GatewayProcess"]


class GatewayProcess:
    """`vmfleet gateway` with ``JWT_SECRET`` = tests.support.gateway.SECRET; same port on
    every start, so clients keep their base URL across a kill and a restart."""

    def __init__(self, nats_urls: str, prefix: str, **env: str) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "NATS_URL": nats_urls,
            "JWT_SECRET": SECRET,
            "VMFLEET_SUBJECT_PREFIX": prefix,
            "PORT": str(self.port),
            "VMFLEET_LOG_LEVEL": "INFO",
            **env,
        }
        self.token = mint()
        self.proc: subprocess.Popen[bytes] | None = None
        handle, name = tempfile.mkstemp(prefix="vg", suffix="-gateway.log", dir="/tmp")
        os.close(handle)
        self.log = Path(name)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [VMFLEET, "gateway", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until ``/health`` answers (the gateway is connected to NATS and serving)."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vmfleet gateway exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"vmfleet gateway not serving after {timeout_s}s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL: in-flight requests are cut off; commands already sent stay queued."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)
