"""The worker's side of every guest agent on this host: one channel per running instance.

The hub is told when an instance's VM comes up (:meth:`AgentHub.attach`, with where its
agent is reached) and when it goes away (:meth:`AgentHub.detach`: stop, standby, delete,
a VMM that died). While attached it keeps a channel to the agent, reconnecting whenever it
is lost (a restored VM, a restarted agent). When the VM goes away every open session ends
with AgentSessionClosed; with no live agent, :meth:`AgentHub.open_session` raises
AgentUnavailable.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from types import TracebackType

import anyio
from anyio.abc import TaskGroup, TaskStatus

from worker.agent.channel import AgentChannel
from worker.agent.connect import open_endpoint
from worker.agent.errors import AgentUnavailable, ChannelLost
from worker.agent.session import AgentSession, SessionKind
from worker.drivers.base import AgentEndpoint

__all__ = ["AgentHub"]

log = logging.getLogger(__name__)

#: How many detached instances the hub remembers the reason of.
_GONE_KEPT = 1024

#: A VM just attached (restored, adopted by a restarted worker) has an agent that answers
#: in well under a second: sessions opened that early wait this long for its first answer
#: instead of failing at once, whatever their own ``wait_s``.
FIRST_ANSWER_GRACE_S = 10.0

#: Told (instance id, level, message) when an instance's agent answers or is lost.
AgentNews = Callable[[str, str, str], None]


class _Link:
    """The hub's hold on one instance's agent, across reconnections."""

    def __init__(self, instance_id: str, endpoint: AgentEndpoint) -> None:
        self.instance_id = instance_id
        self.endpoint = endpoint
        self.scope = anyio.CancelScope()
        self.channel: AgentChannel | None = None
        self.sids = itertools.count(1)
        self.changed = anyio.Event()
        #: Why the agent is not available (shown in AgentUnavailable).
        self.problem = "the agent has not answered yet"
        self.detached = False
        self.answered = False
        self.attached_at = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.channel.ready

    def wait_for(self, wait_s: float) -> float:
        """How long a session opened now waits: at least until the first answer's grace
        runs out, while the agent has not answered since the attach."""
        if self.answered:
            return wait_s
        return max(wait_s, self.attached_at + FIRST_ANSWER_GRACE_S - time.monotonic())

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class AgentHub:
    """One per worker. Use as ``async with AgentHub() as hub`` or run :meth:`run` in a task
    group (the daemon does)."""

    def __init__(
        self,
        *,
        agent_present: bool = True,
        heartbeat_s: float = 2.0,
        dead_after_s: float = 15.0,
        retry_s: float = 0.5,
    ) -> None:
        #: False when this host's guests have no agent (it was not built): readiness does
        #: not wait for one, and every session is refused with the reason.
        self.agent_present = agent_present
        self._heartbeat_s = heartbeat_s
        self._dead_after_s = dead_after_s
        self._retry_s = retry_s
        self._links: dict[str, _Link] = {}
        #: Why instances were detached (said when a session is asked of one); bounded.
        self._gone: dict[str, str] = {}
        self._tg: TaskGroup | None = None
        self._closing = anyio.Event()
        #: The daemon points this at the instance's ops log.
        self.on_news: AgentNews = lambda instance_id, level, message: None

    # -- running -----------------------------------------------------------------------------

    async def __aenter__(self) -> AgentHub:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        for instance_id in list(self._links):
            self.detach(instance_id, "the worker is shutting down")
        self._tg.cancel_scope.cancel()
        try:
            # The body's own exception goes on as it is (not wrapped in a group).
            await self._tg.__aexit__(None, None, None)
        finally:
            self._tg = None
        return None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled or :meth:`close`; every channel is closed on the way out."""
        async with self:
            task_status.started()
            await self._closing.wait()

    def close(self) -> None:
        """End :meth:`run` (the daemon's shutdown, after its instances were dealt with)."""
        self._closing.set()

    # -- what the lifecycle tells it ---------------------------------------------------------

    def attach(self, instance_id: str, endpoint: AgentEndpoint | None) -> None:
        """The instance's VM runs: keep a channel to its agent at ``endpoint`` (None: a VM
        made without an agent channel). Attaching again to the same endpoint changes
        nothing; to another one, starts over."""
        link = self._links.get(instance_id)
        if link is not None and link.endpoint == endpoint:
            return
        if link is not None:
            self.detach(instance_id, "the VM was replaced")
        if endpoint is None or not self.agent_present or self._tg is None:
            return
        link = _Link(instance_id, endpoint)
        self._links[instance_id] = link
        self._gone.pop(instance_id, None)
        self._tg.start_soon(self._keep, link)

    def detach(self, instance_id: str, reason: str = "the VM went away") -> None:
        """The instance's VM is going or gone: its open sessions end with ``reason``."""
        link = self._links.pop(instance_id, None)
        if link is None:
            return
        self._gone[instance_id] = reason
        while len(self._gone) > _GONE_KEPT:
            del self._gone[next(iter(self._gone))]
        link.detached = True
        link.problem = reason
        if link.channel is not None:
            link.channel.lose(reason)
        link.scope.cancel()
        link.notify()

    # -- what sessions use -------------------------------------------------------------------

    def is_ready(self, instance_id: str) -> bool:
        link = self._links.get(instance_id)
        return link is not None and link.ready

    async def wait_ready(self, instance_id: str, timeout_s: float) -> None:
        """Return once the instance's agent answered; AgentUnavailable after ``timeout_s``.
        Returns at once on a host whose guests have no agent."""
        if not self.agent_present:
            return
        await self._ready_link(instance_id, timeout_s)

    async def open_session(
        self, instance_id: str, kind: SessionKind, *, wait_s: float = 0.0
    ) -> AgentSession:
        """A new session with the instance's agent, waiting up to ``wait_s`` for the agent."""
        if not self.agent_present:
            raise AgentUnavailable(
                "this host's guests have no agent: build it (scripts/install.sh) and restart "
                "the worker"
            )
        fresh = self._links.get(instance_id)
        if fresh is not None:
            wait_s = fresh.wait_for(wait_s)
        link = await self._ready_link(instance_id, wait_s)
        assert link.channel is not None
        try:
            return await link.channel.open(kind)
        except ChannelLost as exc:
            raise AgentUnavailable(
                f"the agent of instance {instance_id} is not available: {exc}"
            ) from None

    async def ping(self, instance_id: str, *, wait_s: float = 0.0) -> float:
        """One round trip to the agent in seconds (the floor under every session)."""
        link = await self._ready_link(instance_id, wait_s)
        assert link.channel is not None
        try:
            return await link.channel.ping()
        except ChannelLost as exc:
            raise AgentUnavailable(str(exc)) from None

    def agent_info(self, instance_id: str) -> dict[str, object]:
        """What the agent said in its handshake (pid, limits); empty if not connected."""
        link = self._links.get(instance_id)
        if link is None or link.channel is None:
            return {}
        return dict(link.channel.agent_info)

    # -- inside ------------------------------------------------------------------------------

    async def _ready_link(self, instance_id: str, wait_s: float) -> _Link:
        with anyio.move_on_after(max(wait_s, 0.0)):
            while True:
                link = self._links.get(instance_id)
                if link is not None and link.ready:
                    return link
                if wait_s <= 0:
                    break
                if link is None:
                    await anyio.sleep(0.1)  # not attached yet (the VM is still starting)
                else:
                    await link.changed.wait()
        link = self._links.get(instance_id)
        if link is not None and link.ready:
            return link
        if link is not None:
            lost = link.channel.lost if link.channel is not None else None
            why = lost or link.problem
        else:
            why = self._gone.get(instance_id, "its VM is not running on this host")
        raise AgentUnavailable(f"the agent of instance {instance_id} is not available: {why}")

    async def _keep(self, link: _Link) -> None:
        """Connect, serve, and connect again until detached."""
        with link.scope:
            while not link.detached:
                await self._serve_once(link)
                if not link.detached:
                    await anyio.sleep(self._retry_s)

    async def _serve_once(self, link: _Link) -> None:
        try:
            stream = await open_endpoint(link.endpoint)
        except (OSError, TimeoutError) as exc:
            link.problem = f"its channel is not reachable ({exc})"
            return
        channel = AgentChannel(
            stream,
            sids=link.sids,
            heartbeat_s=self._heartbeat_s,
            dead_after_s=self._dead_after_s,
        )
        link.channel = channel

        def on_ready() -> None:
            pid = channel.agent_info.get("pid")
            log.info("%s: agent ready (pid %s)", link.instance_id, pid)
            self.on_news(link.instance_id, "INFO", f"guest agent ready pid={pid}")
            link.answered = True
            link.notify()

        try:
            async with stream:
                await channel.serve(on_ready)
        except ChannelLost as exc:
            if not link.detached:
                link.problem = str(exc)
                log.info("%s: agent channel lost: %s", link.instance_id, exc)
                if channel.agent_info:  # it had answered: say it is gone
                    self.on_news(link.instance_id, "WARN", f"guest agent not available: {exc}")
        finally:
            link.channel = None
            link.notify()
