"""When undoing a failed operation fails too, the instance's ops log says what was left.

A start whose boot fails is undone (VMM killed, network released); here the release fails
as well, as a host whose network tooling broke would: the start still fails with its own
error, the instance is Stopped, and the ops log names the step that could not be undone.
"""

from __future__ import annotations

import pytest

from schemas.api import InstanceState
from schemas.errors import HypervisorError
from schemas.messages import Start, Stop
from tests.worker.conftest import create_command, now
from worker.engine import HostEngine
from worker.lifecycle import start as start_module
from worker.lifecycle.context import LocalInstance, OpContext

pytestmark = [pytest.mark.anyio, pytest.mark.vm]


async def test_a_failed_undo_of_start_is_in_the_ops_log(
    engine: HostEngine, busybox_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cmd = create_command(busybox_image)
    await engine.execute(cmd)
    await engine.execute(Stop(id="stop", instance_id=cmd.instance_id, issued_at=now()))

    async def boot_fails(*args: object) -> None:
        raise HypervisorError("the VMM would not boot")

    async def unplug_fails(ctx: OpContext, inst: LocalInstance) -> None:
        raise OSError("ip: command not found")

    monkeypatch.setattr(start_module, "boot_to_running", boot_fails)
    monkeypatch.setattr(start_module, "unplug", unplug_fails)
    with pytest.raises(HypervisorError, match="would not boot"):
        await engine.execute(Start(id="start", instance_id=cmd.instance_id, issued_at=now()))

    assert engine.get(cmd.instance_id).state is InstanceState.STOPPED
    ops = engine.instance(cmd.instance_id).guest.ops_log.read_text()
    assert "ERROR start undo: network not released" in ops, ops
    assert "ip: command not found" in ops, ops
