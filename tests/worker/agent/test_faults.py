"""The agent across standby/restore, and an agent killed inside the guest (the init
starts it again)."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from schemas.api import InstanceState
from schemas.messages import Restore, Standby
from tests.worker.agent.conftest import Guest
from tests.worker.conftest import now, wait_for_log
from worker.agent import AgentSessionClosed, AgentUnavailable, Frame

pytestmark = pytest.mark.vm


def test_standby_ends_sessions_and_exec_works_at_once_after_restore(guest: Guest) -> None:
    async def scenario() -> None:
        session = await guest.open("exec")
        await session.send(Frame.json({"command": ["sleep", "600"], "tty": False}))
        iid = guest.instance_id
        await guest.engine.execute(Standby(id=f"standby-{iid}", instance_id=iid, issued_at=now()))
        with pytest.raises(AgentSessionClosed):
            await session.receive()
        with pytest.raises(AgentUnavailable, match=r"Paused|Standby"):
            await guest.open("exec")
        record = await guest.engine.execute(
            Restore(id=f"restore-{iid}", instance_id=iid, issued_at=now())
        )
        assert record is not None and record.state is InstanceState.RUNNING
        out = await guest.exec({"command": ["echo", "restored"]}, wait_s=30)
        assert out.data == b"restored\n"
        # The session cut by the standby left nothing behind in the guest.
        ps = await guest.exec({"command": ["ps", "-o", "args"]})
        assert b"sleep 600" not in ps.data

    guest.run(scenario)


def test_an_agent_killed_in_the_guest_ends_its_sessions(guest: Guest) -> None:
    async def scenario() -> None:
        pid = guest.hub.agent_info(guest.instance_id)["pid"]
        victim = await guest.open("exec")
        await victim.send(Frame.json({"command": ["sleep", "600"], "tty": False}))
        with contextlib.suppress(AgentSessionClosed):  # the agent may die before it answers
            await guest.exec({"command": ["kill", "-9", str(pid)]})
        with anyio.fail_after(60), pytest.raises(AgentSessionClosed):
            await victim.receive()
        with pytest.raises(AgentUnavailable, match="exited"):
            await guest.open("exec")
        # The instance's ops log says so too.
        ops_log = guest.engine.instance(guest.instance_id).guest.ops_log
        await wait_for_log(ops_log, "guest agent not available: the agent exited in the guest")
        # The init starts the agent again, and the new agent kills what the old one left.
        out = await guest.exec({"command": ["ps", "-o", "args"]}, wait_s=120)
        assert out.exit_code == 0 and b"sleep 600" not in out.data
        assert guest.hub.agent_info(guest.instance_id)["pid"] != pid

    guest.run(scenario)
