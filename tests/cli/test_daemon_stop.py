"""A daemon asked to stop (SIGTERM, or Ctrl-C for `vmfleet dev`) stops cleanly: exit 0,
one line per component, and no traceback from asyncio or the NATS client on the way out.

Each daemon serves a little traffic first, so that NATS subscriptions, requests and
pings are in flight when the signal arrives (that is when tracebacks used to show up).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cli.embedded_nats import NatsServerProcess, free_port
from tests.support.dev import ASSETS, VMFLEET, stop_process
from tests.support.fleet import WorkerProcess
from tests.support.secure_nats import GatewayProcess

NOISE = ("Traceback", "exception was never retrieved", "InvalidStateError", "reconnecting")


def assert_clean(output: str, *stopped: str) -> None:
    for noise in NOISE:
        assert noise not in output, output[-4000:]
    for line in stopped:
        assert line in output, output[-4000:]


def wait_for(predicate: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout_s}s")


def some_traffic(base_url: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        for _ in range(5):
            assert client.get("/instances").status_code == 200
            assert client.get("/hosts").status_code == 200
            assert client.get("/volumes").status_code == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dev_stops_without_a_traceback(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    env = {
        **os.environ,
        "VMFLEET_HOST_ID": "dev-host",
        "VMFLEET_LOG_LEVEL": "INFO",
        "VMFLEET_ASSETS_DIR": str(ASSETS),
    }
    env.pop("JWT_SECRET", None)
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(
            [VMFLEET, "dev", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            stdout=out,
            stderr=err,
            env=env,
        )
    try:
        wait_for(lambda: "HYPEMAN_API_KEY=" in stdout.read_text(), "banner")
        token = stdout.read_text().split("HYPEMAN_API_KEY=", 1)[1].split()[0]
        wait_for(lambda: "is taking commands" in stderr.read_text(), "worker")
        some_traffic(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"})
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0, stderr.read_text()[-4000:]
    finally:
        stop_process(proc)
    assert_clean(
        stderr.read_text(),
        f"received {sig.name}, stopping",
        "gateway and worker dev-host stopped",
        "nats-server stopped",
    )


def test_gateway_stops_without_a_traceback(tmp_path: Path, nats_server: NatsServerProcess) -> None:
    gateway = GatewayProcess({"NATS_URL": nats_server.url}, tmp_path / "gateway.log")
    gateway.start()
    assert gateway.proc is not None
    try:
        gateway.wait_ready()
        some_traffic(gateway.base_url, gateway.headers())
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(timeout=60) == 0, gateway.log.read_text()[-4000:]
    finally:
        stop_process(gateway.proc)
    assert_clean(gateway.log.read_text(), "received SIGTERM, stopping", "gateway stopped")


def test_worker_stops_without_a_traceback(nats_server: NatsServerProcess) -> None:
    worker = WorkerProcess(nats_server.url, "tstop", ASSETS, VMFLEET_METRICS_ADDR="off")
    worker.start()
    assert worker.proc is not None
    try:
        wait_for(lambda: "is taking commands" in worker.log.read_text(), "worker")
        worker.proc.send_signal(signal.SIGTERM)
        code = worker.proc.wait(timeout=60)
        output = worker.log.read_text()
    finally:
        stop_process(worker.proc)
        worker.cleanup()
    assert code == 0, output[-4000:]
    assert_clean(output, "received SIGTERM, stopping", f"worker {worker.host_id} stopped")
