"""Sending a lifecycle command to the host that owns its subject, and awaiting the outcome.

The command goes into the host's JetStream work queue with its id as ``Nats-Msg-Id``, so a
retried HTTP call with the same idempotency key is dropped by JetStream instead of running
twice. The result comes back on ``<p>.result.<id>``, which is subscribed to *before* the
command is published. A duplicate publish (the command was sent before) asks the host for
the outcome it recorded. No answer in time means 504 ``host_unavailable``: the command
stays queued and runs when the host is back; nothing is half-done.
"""

from __future__ import annotations

import logging

import anyio
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError

from natsbus.backoff import Backoff
from schemas.codec import decode_command_result, encode
from schemas.errors import HostUnavailable, OpTimeout
from schemas.messages import AnyCommand, CommandResult
from schemas.subjects import Subjects

__all__ = ["CommandSender"]

log = logging.getLogger(__name__)


class CommandSender:
    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        *,
        timeout_s: float = 120.0,
        publish_retry_s: float = 15.0,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self.timeout_s = timeout_s
        self.publish_retry_s = publish_retry_s

    async def send(
        self, host: str, cmd: AnyCommand, *, timeout_s: float | None = None
    ) -> CommandResult:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        subscription = await self._nc.subscribe(self._subjects.result(cmd.id), max_msgs=1)
        try:
            ack = await self._publish(host, cmd)
            if ack.duplicate:
                recorded = await self._recorded_result(host, cmd.id)
                if recorded is not None:
                    return recorded
            try:
                message = await subscription.next_msg(timeout=timeout)
            except NatsTimeoutError:
                raise OpTimeout(
                    f"host {host} did not finish {cmd.op} within {timeout:g}s; "
                    "the command stays queued and runs when the host can"
                ) from None
            return decode_command_result(message.data)
        finally:
            with anyio.CancelScope(shield=True):
                await subscription.unsubscribe()

    async def _publish(self, host: str, cmd: AnyCommand) -> PubAck:
        """Publish, retrying while the cluster fails over (a server lost, a stream leader
        being elected). Safe to repeat: the command id is the message id, so JetStream
        keeps one copy."""
        backoff = Backoff(first_s=0.1, max_s=1.0)
        with anyio.move_on_after(self.publish_retry_s):
            while True:
                try:
                    return await self._nc.jetstream().publish(
                        self._subjects.command(host, cmd.op),
                        encode(cmd),
                        headers={"Nats-Msg-Id": cmd.id},
                        timeout=2,
                    )
                except (
                    NoStreamResponseError,
                    NatsTimeoutError,
                    NoRespondersError,
                    ConnectionClosedError,
                    ConnectionReconnectingError,
                ) as exc:
                    log.info("publishing %s to %s: %s; retrying", cmd.op, host, exc)
                    await backoff.sleep()
        raise HostUnavailable(
            f"the fleet's message bus took no command for {self.publish_retry_s:g}s",
            code="nats_unavailable",
        )

    async def ask_host(self, host: str, method: str, payload: bytes, timeout_s: float) -> bytes:
        """A host-local query (``Subjects.host_query``): the host's answer, or 503."""
        try:
            reply = await self._nc.request(
                self._subjects.host_query(host, method), payload, timeout=timeout_s
            )
        except (NatsTimeoutError, NoRespondersError):
            raise HostUnavailable(f"host {host} is not answering") from None
        return bytes(reply.data)

    async def _recorded_result(self, host: str, command_id: str) -> CommandResult | None:
        """The outcome the host recorded for a command sent before, if it has finished."""
        try:
            reply = await self._nc.request(
                self._subjects.host_query(host, "result"), command_id.encode(), timeout=5
            )
        except (NatsTimeoutError, NoRespondersError):
            raise HostUnavailable(f"host {host} is not answering") from None
        return decode_command_result(reply.data) if reply.data else None
