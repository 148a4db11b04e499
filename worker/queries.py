"""Host-local queries over core request/reply: answers only this host has."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import encode
from schemas.errors import VmfleetError
from schemas.messages import StatsReply
from schemas.subjects import Subjects
from worker.engine import HostEngine
from worker.ledger import Ledger
from worker.usage import instance_stats

__all__ = ["serve_queries", "stats_reply"]

log = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[None]]


async def serve_queries(
    nc: Client,
    subjects: Subjects,
    host_id: str,
    ledger: Ledger,
    engine: HostEngine | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``<p>.host.<host>.result``: the recorded result of a command id (empty if
    the command has not finished here); and, given the engine, ``<p>.host.<host>.stats``:
    what one of its instances uses (the payload is the instance id)."""

    async def on_result(msg: Msg) -> None:
        result = ledger.get(msg.data.decode(errors="replace"))
        await msg.respond(encode(result) if result is not None else b"")

    handlers: dict[str, Handler] = {"result": on_result}
    if engine is not None:

        async def on_stats(msg: Msg) -> None:
            await msg.respond(encode(stats_reply(engine, msg.data.decode(errors="replace"))))

        handlers["stats"] = on_stats
    async with _subscribed(nc, subjects, host_id, handlers):
        task_status.started()
        await anyio.sleep_forever()


def stats_reply(engine: HostEngine, instance_id: str) -> StatsReply:
    """The instance's stats, or the error (404 when it is not on this host)."""
    try:
        return StatsReply(stats=instance_stats(engine.instance(instance_id)))
    except VmfleetError as exc:
        return StatsReply(error=exc.info())


@contextlib.asynccontextmanager
async def _subscribed(
    nc: Client, subjects: Subjects, host_id: str, handlers: dict[str, Handler]
) -> AsyncIterator[None]:
    subscriptions = []
    try:
        for method, handler in handlers.items():
            subject = subjects.host_query(host_id, method)
            subscriptions.append(await nc.subscribe(subject, cb=handler))
        yield
    finally:
        with anyio.CancelScope(shield=True):
            for subscription in subscriptions:
                await subscription.unsubscribe()
