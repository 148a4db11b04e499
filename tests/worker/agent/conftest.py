"""One real QEMU guest per test module, with an agent hub wired the way the daemon wires it.

The guest and the hub live in a blocking portal's event loop so that one guest serves every
test of a module (booting one takes a while under TCG); tests call into it with ``run``.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from schemas.messages import Delete
from tests.worker.conftest import create_command, make_context, now
from worker.agent import AgentHub, AgentSession, Frame, SessionKind, track_instance
from worker.daemon import _agent_news
from worker.engine import HostEngine
from worker.lifecycle.context import BootAssets, OpContext

T = TypeVar("T")


@dataclass
class Output:
    data: bytes = b""
    texts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int | None:
        codes = [t["exitCode"] for t in self.texts if "exitCode" in t]
        return codes[-1] if codes else None


@dataclass
class Guest:
    portal: BlockingPortal
    hub: AgentHub
    engine: HostEngine
    instance_id: str

    def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        return self.portal.call(fn, *args)

    async def open(self, kind: SessionKind, wait_s: float = 0.0) -> AgentSession:
        return await self.hub.open_session(self.instance_id, kind, wait_s=wait_s)

    async def exec(
        self, request: dict[str, Any], stdin: bytes | None = None, *, wait_s: float = 0.0
    ) -> Output:
        """One exec through the agent, as the relay would carry it; the whole output."""
        async with await self.open("exec", wait_s) as session:
            await session.send(Frame.json({"tty": False, **request}))
            if stdin is not None:
                await session.send(Frame(False, stdin))
                await session.send_eof()
            return await collect(session)

    def exec_sync(self, command: list[str], **request: Any) -> Output:
        return self.run(self.exec, {"command": command, **request})


async def collect(session: AgentSession) -> Output:
    out = Output()
    try:
        while True:
            frame = await session.receive()
            if frame.text:
                out.texts.append(json.loads(frame.data))
            else:
                out.data += frame.data
    except anyio.EndOfStream:
        return out


def attach_agent_hub(ctx: OpContext, hub: AgentHub) -> None:
    """The hub follows the engine's instances, as the worker daemon wires it."""
    ctx.on_transition = lambda inst, previous: track_instance(hub, ctx.driver, inst)
    ctx.on_removed = lambda record: hub.detach(record.id, "the instance was deleted")
    ctx.agent = hub


@pytest.fixture(scope="module")
def guest(boot_assets: BootAssets, busybox_image: str) -> Iterator[Guest]:
    data_dir = Path(tempfile.mkdtemp(prefix="vfa", dir="/tmp"))
    try:
        with start_blocking_portal() as portal:
            hub = AgentHub()
            hub_task, _ = portal.start_task(hub.run)
            ctx = make_context(data_dir, boot_assets)
            attach_agent_hub(ctx, hub)
            engine = HostEngine(ctx)
            hub.on_news = functools.partial(_agent_news, engine)  # as the daemon wires it
            cmd = create_command(busybox_image, cmd=["sleep", "100000"])
            try:
                portal.call(engine.execute, cmd)
                portal.call(hub.wait_ready, cmd.instance_id, 180.0)
                yield Guest(portal, hub, engine, cmd.instance_id)
            finally:
                portal.call(_delete_all, engine)
                hub_task.cancel()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _delete_all(engine: HostEngine) -> None:
    with anyio.CancelScope(shield=True):
        for record in list(engine.records()):
            await engine.execute(
                Delete(id=f"cleanup-{record.id}", instance_id=record.id, issued_at=now())
            )
