"""A new worker adopts the VMs of the old one; delete leaves no trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.api import InstanceState
from schemas.messages import Delete, Stop
from tests.support.processes import live_children
from tests.worker.conftest import create_command, make_context, now, wait_for_log
from worker.engine import HostEngine
from worker.lifecycle.context import BootAssets

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def test_new_engine_adopts_running_vm(
    engine: HostEngine, busybox_image: str, data_dir: Path, boot_assets: BootAssets
) -> None:
    cmd = create_command(
        busybox_image, cmd=["/bin/sh", "-c", "echo up; while true; do sleep 1; done"]
    )
    await engine.execute(cmd)
    pid = engine.instance(cmd.instance_id).process.pid  # type: ignore[union-attr]
    await wait_for_log(engine.instance(cmd.instance_id).guest.app_log, "up")

    successor = HostEngine(make_context(data_dir, boot_assets))
    await successor.recover()
    adopted = successor.instance(cmd.instance_id)
    assert adopted.state is InstanceState.RUNNING
    assert adopted.process is not None and adopted.process.pid == pid

    record = await successor.execute(Stop(id="s", instance_id=cmd.instance_id, issued_at=now()))
    assert record is not None and record.state is InstanceState.STOPPED
    engine._instances.clear()  # the old engine is gone; the successor owns the instance
    await successor.execute(Delete(id="d", instance_id=cmd.instance_id, issued_at=now()))


async def test_dead_vmm_is_recorded_not_lost(
    engine: HostEngine, busybox_image: str, data_dir: Path, boot_assets: BootAssets
) -> None:
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", "while true; do sleep 1; done"])
    await engine.execute(cmd)
    await engine.instance(cmd.instance_id).process.kill_and_reap()  # type: ignore[union-attr]

    successor = HostEngine(make_context(data_dir, boot_assets))
    await successor.recover()
    record = successor.get(cmd.instance_id)
    assert record.state is InstanceState.STOPPED
    assert record.state_error is not None and "VMM was gone" in record.state_error
    engine._instances.clear()
    await successor.execute(Delete(id="d", instance_id=cmd.instance_id, issued_at=now()))


async def test_delete_leaves_no_trace(engine: HostEngine, busybox_image: str) -> None:
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", "while true; do sleep 1; done"])
    await engine.execute(cmd)
    guest_dir = engine.instance(cmd.instance_id).guest.root
    assert (
        await engine.execute(Delete(id="d", instance_id=cmd.instance_id, issued_at=now())) is None
    )
    assert not guest_dir.exists()
    assert not [name for _, name in live_children() if name.startswith("qemu")]
