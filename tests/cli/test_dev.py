"""`vmfleet dev` end to end: one command brings up NATS, a worker and the gateway; Ctrl-C
stops all of it, and what NATS stored survives for the next run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import anyio
import httpx
import nats
import pytest

from cli.embedded_nats import free_port
from tests.support.dev import VMFLEET, DevStack, dev_stack
from tests.support.processes import live_children


def _stop(stack: DevStack) -> int:
    stack.proc.send_signal(signal.SIGINT)
    return stack.proc.wait(timeout=60)


async def _put(nats_url: str, bucket: str, key: str, value: bytes) -> None:
    nc = await nats.connect(nats_url)
    try:
        await (await nc.jetstream().key_value(bucket)).put(key, value)
    finally:
        await nc.close()


async def _get(nats_url: str, bucket: str, key: str) -> bytes | None:
    nc = await nats.connect(nats_url)
    try:
        return (await (await nc.jetstream().key_value(bucket)).get(key)).value
    finally:
        await nc.close()


def test_dev_stack_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    with dev_stack(tmp_path, port) as stack:
        assert stack.base_url == f"http://127.0.0.1:{port}"
        health = httpx.get(f"{stack.base_url}/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        metrics = httpx.get(f"{stack.base_url}/metrics")
        assert metrics.status_code == 200
        assert "# TYPE vmfleet_gateway_requests" in metrics.text

        hosts = httpx.get(
            f"{stack.base_url}/hosts", headers={"Authorization": f"Bearer {stack.token}"}
        )
        assert hosts.status_code == 200
        assert [h["id"] for h in hosts.json()] == ["dev-host"]
        assert httpx.get(f"{stack.base_url}/hosts").status_code == 401

        # `vmfleet token` finds the secret the dev stack keeps, and its token is accepted.
        minted = subprocess.run(
            [VMFLEET, "token", "--data-dir", str(tmp_path)],
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        authed = httpx.get(f"{stack.base_url}/hosts", headers={"Authorization": f"Bearer {minted}"})
        assert authed.status_code == 200

        anyio.run(_put, stack.nats_url, "vmfleet_instances", "survivor", b"still here")
        children = [pid for pid, _ in live_children(stack.proc.pid)]
        assert _stop(stack) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived vmfleet dev"

    with dev_stack(tmp_path, port) as stack:
        assert anyio.run(_get, stack.nats_url, "vmfleet_instances", "survivor") == b"still here"
        assert _stop(stack) == 0


def test_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    with dev_stack(tmp_path / "a", free_port()) as first:
        taken = int(first.base_url.rsplit(":", 1)[1])
        done = subprocess.run(
            [VMFLEET, "dev", "--port", str(taken), "--data-dir", str(tmp_path / "b")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1
        assert "Address already in use" in done.stderr
        assert _stop(first) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_stops_too(tmp_path: Path, sig: signal.Signals) -> None:
    with dev_stack(tmp_path, free_port()) as stack:
        stack.proc.send_signal(sig)
        assert stack.proc.wait(timeout=60) == 0


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.vm
def test_ctrl_c_stops_the_vms_too(busybox_image: str) -> None:
    # Short: the guests' unix socket paths live below it (at most 107 bytes).
    data_dir = Path(tempfile.mkdtemp(prefix="vd", dir="/tmp"))
    try:
        with dev_stack(data_dir, free_port()) as stack:
            headers = {"Authorization": f"Bearer {stack.token}"}
            body = {"name": "left-running", "image": busybox_image, "size": "256MB", "vcpus": 1}
            created = httpx.post(
                f"{stack.base_url}/instances", json=body, headers=headers, timeout=300
            )
            assert created.status_code == 201, created.text
            assert created.json()["state"] == "Running"
            vmms = [
                pid
                for pid in _processes_mentioning(str(data_dir / "guests"))
                if "qemu" in Path(f"/proc/{pid}/comm").read_text()
            ]
            assert vmms, "no QEMU process found for the instance"
            assert _stop(stack) == 0
        for pid in vmms:
            assert not Path(f"/proc/{pid}").exists(), f"QEMU {pid} outlived vmfleet dev"

        # The record survives, as what it now is: stopped, not lost.
        with dev_stack(data_dir, free_port()) as stack:
            headers = {"Authorization": f"Bearer {stack.token}"}
            shown = httpx.get(f"{stack.base_url}/instances/left-running", headers=headers)
            assert (shown.status_code, shown.json()["state"]) == (200, "Stopped"), shown.text
            deleted = httpx.delete(
                f"{stack.base_url}/instances/left-running", headers=headers, timeout=120
            )
            assert deleted.status_code == 204, deleted.text
            assert _stop(stack) == 0
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
