"""The subscriber example of docs/events.md runs against a real fleet and prints events."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from cli.embedded_nats import NatsServerProcess
from schemas.api import Hypervisor
from schemas.messages import Create, Delete
from tests.support.fleet import FleetClient, WorkerProcess, now

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

ROOT = Path(__file__).parents[2]


async def test_example_subscriber_prints_transitions_and_a_log_line(
    nats_server: NatsServerProcess, test_assets: Path, busybox_image: str, subject_prefix: str
) -> None:
    worker = WorkerProcess(nats_server.url, subject_prefix, test_assets)
    worker.start()
    fleet = await FleetClient.connect(nats_server.url, subject_prefix)
    try:
        await fleet.wait_for_host(worker.host_id)
        create = Create(
            id="ev-create",
            instance_id="ev1",
            issued_at=now(),
            name="ev1",
            image=busybox_image,
            size_bytes=256 << 20,
            overlay_bytes=256 << 20,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
            cmd=["/bin/sh", "-c", "echo hi; sleep 3600"],
            network_enabled=False,
        )
        assert (await fleet.send(worker.host_id, create)).ok
        argv = [
            sys.executable,
            str(ROOT / "docs/examples/subscriber.py"),
            nats_server.url,
            "ev1",
            "2",
            subject_prefix,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = await anyio.run_process(argv, env=env, check=False)
        out = done.stdout.decode()
        assert done.returncode == 0, done.stderr.decode()
        assert f"{worker.host_id}/ev1: Created -> Initializing" in out
        assert f"{worker.host_id}/ev1: Initializing -> Running" in out
        assert "app: " in out
        assert (
            await fleet.send(
                worker.host_id, Delete(id="ev-del", instance_id="ev1", issued_at=now())
            )
        ).ok
    finally:
        await fleet.close()
        worker.cleanup()
