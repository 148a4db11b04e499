"""What every route works with, built once in the lifespan and kept in ``app.state``.

:meth:`Gateway.execute` is the one way a route changes the fleet: it refuses a host that
is not live (503, nothing sent), sends the command, turns a failed result back into the
worker's exception (same status and code), and waits until this replica's view shows
the outcome, so a client reading right after a write sees it (bounded: views catch up
within milliseconds, and a slow one only delays the read, never breaks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from starlette.requests import Request

from gateway.commands import CommandSender
from gateway.config import GatewayConfig
from gateway.placement import Placement
from gateway.view import FleetView
from schemas.errors import HostUnavailable, VmfleetError, error_from_info
from schemas.messages import AnyCommand, CommandResult
from schemas.subjects import Subjects

__all__ = ["Gateway", "gateway"]

_SETTLE_S: Final = 2.0


@dataclass
class Gateway:
    config: GatewayConfig
    subjects: Subjects
    js: JetStreamContext
    view: FleetView
    sender: CommandSender
    placement: Placement
    _buckets: dict[str, KeyValue] = field(default_factory=dict, repr=False)

    async def bucket(self, name: str) -> KeyValue:
        """The KV bucket ``name``, looked up once: each lookup asks NATS for the stream's
        info, a round trip that would otherwise be part of every create."""
        kv = self._buckets.get(name)
        if kv is None:
            kv = self._buckets[name] = await self.js.key_value(name)
        return kv

    async def execute(
        self,
        host: str,
        cmd: AnyCommand,
        *,
        settled: Callable[[], object] | None = None,
        timeout_s: float | None = None,
    ) -> CommandResult:
        """Run ``cmd`` on ``host`` and return its successful result, or raise its error.

        ``settled`` says when this replica's view reflects the outcome.
        """
        if self.view.live_host(host) is None:
            raise HostUnavailable(f"host {host} is not available; nothing was sent to it")
        timeout = self.config.command_timeout_s if timeout_s is None else timeout_s
        result = await self.sender.send(host, cmd, timeout_s=timeout)
        if not result.ok:
            if result.error is None:
                raise VmfleetError(f"{cmd.op} failed on host {host}")
            raise error_from_info(result.error)
        if settled is not None:
            await self.view.wait_until(settled, _SETTLE_S)
        return result


def gateway(request: Request) -> Gateway:
    """The running gateway of the app serving ``request``."""
    found = getattr(request.app.state, "gateway", None)
    if not isinstance(found, Gateway):
        raise HostUnavailable("the gateway is not connected to NATS yet")
    return found
