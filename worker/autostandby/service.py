"""The host query behind ``GET .../auto-standby/status`` and ``POST .../auto-standby/hold``
(``Subjects.autostandby_query``): a gateway asks, the controller answers."""

from __future__ import annotations

import logging
from typing import Final

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.autostandby import AutoStandbyQuery, AutoStandbyReply
from schemas.codec import encode
from schemas.errors import BadRequest, VmfleetError
from schemas.subjects import Subjects
from worker.autostandby.controller import AutoStandbyController

__all__ = ["answer", "serve_autostandby"]

log = logging.getLogger(__name__)

_QUERY: Final = msgspec.json.Decoder(AutoStandbyQuery)


async def serve_autostandby(
    nc: Client,
    subjects: Subjects,
    host_id: str,
    controller: AutoStandbyController,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the queries until cancelled."""

    async def on_query(msg: Msg) -> None:
        await msg.respond(encode(answer(controller, msg.data)))

    subscription = await nc.subscribe(subjects.autostandby_query(host_id), cb=on_query)
    try:
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await subscription.unsubscribe()


def answer(controller: AutoStandbyController, payload: bytes) -> AutoStandbyReply:
    """The status after the query's action, or the error in the API's shape."""
    try:
        query = _QUERY.decode(payload)
        if query.action == "hold":
            return AutoStandbyReply(status=controller.hold(query.instance_id))
        return AutoStandbyReply(status=controller.status(query.instance_id))
    except msgspec.DecodeError as exc:
        return AutoStandbyReply(error=BadRequest(f"malformed auto-standby query: {exc}").info())
    except VmfleetError as exc:
        return AutoStandbyReply(error=exc.info())
