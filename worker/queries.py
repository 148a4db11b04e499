"""Host-local queries over core request/reply: answers only this host has."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import encode
from schemas.subjects import Subjects
from worker.ledger import Ledger

__all__ = ["serve_queries"]

log = logging.getLogger(__name__)


async def serve_queries(
    nc: Client,
    subjects: Subjects,
    host_id: str,
    ledger: Ledger,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``<p>.host.<host>.result``: the recorded result of a command id (empty if
    the command has not finished here)."""

    async def on_result(msg: Msg) -> None:
        result = ledger.get(msg.data.decode(errors="replace"))
        await msg.respond(encode(result) if result is not None else b"")

    subscription = await nc.subscribe(subjects.host_query(host_id, "result"), cb=on_result)
    task_status.started()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await subscription.unsubscribe()
