"""A new worker adopts the VMs of the old one; delete leaves no trace."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from schemas.api import InstanceState
from schemas.messages import Delete, Start, Stop
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


async def test_vmm_crash_is_noticed_recorded_and_recoverable(
    engine: HostEngine, busybox_image: str
) -> None:
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", "while true; do sleep 1; done"])
    await engine.execute(cmd)
    process = engine.instance(cmd.instance_id).process
    assert process is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.watch_vmms, 0.2)
        os.kill(process.pid, signal.SIGKILL)  # QEMU dies under the running worker
        with anyio.fail_after(60):
            while engine.get(cmd.instance_id).state is not InstanceState.STOPPED:
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    record = engine.get(cmd.instance_id)
    assert record.state_error is not None, record
    assert not Path(f"/proc/{process.pid}").exists()

    restarted = await engine.execute(Start(id="s", instance_id=cmd.instance_id, issued_at=now()))
    assert restarted is not None and restarted.state is InstanceState.RUNNING
    assert restarted.state_error is None
    await engine.execute(Delete(id="d", instance_id=cmd.instance_id, issued_at=now()))
