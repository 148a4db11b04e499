"""Pushing this host's records to NATS: instance records to KV, transitions to the states
stream, in the order they happened.

Operations record changes locally first (metadata.json) and enqueue them here without
waiting, so a NATS outage never fails an operation half-way; the publisher retries until
NATS is back. A command is acknowledged only after :meth:`RecordPublisher.flush`, so a
client never sees "done" before the fleet can read the outcome.

Only *transient* failures are retried (NATS unreachable or reconnecting, a timeout, no
responders while a stream elects a leader). A change NATS will never take (the host's user
may not write that subject, the record exceeds the payload limit, JetStream refuses the
request) is logged and dropped, and the next flush of that instance or volume raises
:class:`PublishRefused`: one bad record fails its own command and every other command on
the host goes on. A flush waits at most ``flush_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats import errors as nats_errors
from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    ServerError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from natsbus import PublishDenials, kv_subject, live_entries
from natsbus.backoff import Backoff
from schemas.api import InstanceState
from schemas.autostandby import TransitionCause
from schemas.clock import utc_now
from schemas.codec import decode_instance_record, decode_volume_record, encode
from schemas.errors import HostUnavailable, VmfleetError
from schemas.messages import InstanceRecord, StateEvent, VolumeRecord
from schemas.subjects import Subjects

__all__ = ["PublishRefused", "PublishStalled", "RecordPublisher"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a command waits for its outcome to reach NATS before it answers an error.
#: Below the gateway's wait for a result (55 s), so the client hears why.
FLUSH_TIMEOUT_S = 30.0
#: One attempt at one change; nats-py's own request timeout (5 s) is inside it.
_ATTEMPT_TIMEOUT_S = 10.0

#: Failures that go away when NATS does: retried with backoff.
_TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats-py's TimeoutError and FlushTimeoutError subclass it
    nats_errors.NoRespondersError,
    NoStreamResponseError,  # no responders on the stream's subject: a leader election
    ServiceUnavailableError,
    ServerError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.StaleConnectionError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.NoServersError,
    OSError,
)


class PublishRefused(VmfleetError):
    """NATS will not take a record of this host; retrying cannot help."""


class PublishStalled(HostUnavailable):
    """NATS did not take this host's records in time; they stay queued."""


@dataclass(frozen=True)
class _Change:
    record: InstanceRecord
    previous: InstanceState | None
    deleted: bool = False
    #: The health status changed while the state did not: a ``health`` event.
    health_changed: bool = False


@dataclass(frozen=True)
class _VolumeChange:
    volume_id: str
    record: VolumeRecord | None


@dataclass
class _Flush:
    done: anyio.Event
    key: str | None
    refusal: str | None = None


class RecordPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        host_id: str,
        *,
        denials: PublishDenials | None = None,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._host_id = host_id
        self._denials = denials or PublishDenials()
        self._flush_timeout_s = flush_timeout_s
        #: Changes NATS refused, by instance or volume id, until a flush of that id reports it.
        self._refused: dict[str, str] = {}
        self._send, self._receive = anyio.create_memory_object_stream[
            _Change | _VolumeChange | _Flush
        ](math.inf)
        self._revisions: dict[str, int] = {}
        self._seq: defaultdict[str, int] = defaultdict(int)
        self._kv: KeyValue | None = None
        self._scope = anyio.CancelScope(shield=True)
        self._volumes: KeyValue | None = None
        #: Each instance's last health status, to tell a change of it.
        self._health: dict[str, str] = {}

    def changed(self, record: InstanceRecord, previous: InstanceState | None) -> None:
        health = record.health_status
        last = self._health.get(record.id)
        self._health[record.id] = health
        # The first record seen (a worker starting) is no change of health.
        health_changed = previous is None and last is not None and last != health
        self._enqueue(_Change(record, previous, health_changed=health_changed))

    def deleted(self, record: InstanceRecord) -> None:
        self._health.pop(record.id, None)
        self._enqueue(_Change(record, record.state, deleted=True))

    def volume_changed(self, volume_id: str, record: VolumeRecord | None) -> None:
        self._enqueue(_VolumeChange(volume_id, record))

    def _enqueue(self, item: _Change | _VolumeChange) -> None:
        try:
            self._send.send_nowait(item)
        except anyio.ClosedResourceError:
            # After shutdown the local files hold the change; the next worker publishes it.
            log.warning("publisher stopped; %s left for the next worker to publish", item)

    async def flush(self, key: str | None = None) -> None:
        """Return once every change enqueued before this call is in NATS (or refused).

        Raises :class:`PublishRefused` when NATS refused a change of instance or volume
        ``key`` since its last flush, and :class:`PublishStalled` when the queue did not
        drain within the flush timeout (NATS away; the changes stay queued and retried).
        """
        marker = _Flush(anyio.Event(), key)
        self._send.send_nowait(marker)
        with anyio.move_on_after(self._flush_timeout_s):
            await marker.done.wait()
        if not marker.done.is_set():
            raise PublishStalled(
                f"host {self._host_id} could not publish its records to NATS within "
                f"{self._flush_timeout_s:g}s; the change is kept on the host and published "
                "once NATS takes it"
            )
        if marker.refusal is not None:
            raise PublishRefused(marker.refusal)

    async def forget_vanished(self, instances: set[str], volumes: set[str]) -> None:
        """Delete this host's records of instances and volumes that are no longer on disk.

        A worker killed between removing an instance's files and publishing the removal
        leaves a record of something that no longer exists; at start, before any command
        runs, this host's truth is what is on disk. Records of other hosts are left alone.
        """
        assert self._kv is not None and self._volumes is not None
        for key, value in await live_entries(self._js, self._subjects.instances_bucket):
            if key not in instances:
                record = _decoded(value, decode_instance_record)
                if record is not None and record.host == self._host_id:
                    log.warning("instance %s is no longer on this host: record removed", key)
                    self.deleted(record)
        for key, value in await live_entries(self._js, self._subjects.volumes_bucket):
            if key not in volumes:
                volume = _decoded(value, decode_volume_record)
                if volume is not None and volume.host == self._host_id:
                    log.warning("volume %s is no longer on this host: record removed", key)
                    self.volume_changed(key, None)
        try:
            await self.flush()
        except PublishStalled as exc:  # they stay queued: the worker need not wait for them
            log.warning("%s", exc)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish until :meth:`stop` (after a last flush) or :meth:`abort`.

        Shielded from the daemon's cancellation on purpose: while the daemon shuts down it
        still stops VMs, and those transitions must reach NATS too.
        """
        self._kv = await self._js.key_value(self._subjects.instances_bucket)
        self._volumes = await self._js.key_value(self._subjects.volumes_bucket)
        task_status.started()
        with self._scope:
            async with self._receive:
                async for item in self._receive:
                    if isinstance(item, _Flush):
                        if item.key is not None:
                            item.refusal = self._refused.pop(item.key, None)
                        item.done.set()
                        continue
                    await self._publish_until_done(item)

    def stop(self) -> None:
        """No more changes: :meth:`run` returns once the queue is empty."""
        self._send.close()

    def abort(self) -> None:
        """Give up on what is still queued (NATS unreachable at shutdown)."""
        self._scope.cancel()

    async def _publish_until_done(self, change: _Change | _VolumeChange) -> None:
        """Publish ``change``, retrying transient failures; a permanent one is recorded."""
        backoff = Backoff(first_s=0.2, max_s=5.0)
        while True:
            started = time.monotonic()
            try:
                with anyio.fail_after(_ATTEMPT_TIMEOUT_S):
                    await self._publish(change)
                return
            except Exception as exc:
                refusal = self._refusal(change, exc, started)
                if refusal is not None:
                    log.error("%s", refusal)
                    self._refused[_key(change)] = refusal
                    return
                log.warning(
                    "publishing %s failed (%r); retrying in %.1fs", change, exc, backoff.delay
                )
            await backoff.sleep()

    def _refusal(self, change: _Change | _VolumeChange, exc: Exception, since: float) -> str | None:
        """Why NATS will never take ``change``, or None when ``exc`` is worth a retry."""
        what = f"{'volume' if isinstance(change, _VolumeChange) else 'instance'} {_key(change)}"
        denied = self._denials.denied_since(self._subjects_of(change), since)
        if denied is not None:  # a denied publish only shows as a timeout
            return (
                f"NATS refused the record of {what}: permissions violation for publish to "
                f"{denied!r} (check the NATS user of host {self._host_id})"
            )
        if isinstance(exc, nats_errors.MaxPayloadError):
            return f"NATS refused the record of {what}: it exceeds the server's max_payload"
        if isinstance(exc, APIError) and not isinstance(exc, _TRANSIENT):
            return f"NATS refused the record of {what}: {exc.description or exc}"
        if isinstance(exc, _TRANSIENT):
            return None
        return f"publishing the record of {what} failed for good: {exc!r}"

    def _subjects_of(self, change: _Change | _VolumeChange) -> list[str]:
        if isinstance(change, _VolumeChange):
            return [kv_subject(self._subjects.volumes_bucket, change.volume_id)]
        record_id = change.record.id
        return [
            kv_subject(self._subjects.instances_bucket, record_id),
            self._subjects.state(self._host_id, record_id),
        ]

    async def _publish(self, change: _Change | _VolumeChange) -> None:
        if isinstance(change, _VolumeChange):
            await self._publish_volume(change)
            return
        record = change.record
        if change.deleted:
            await self._delete_record(record.id)
        else:
            await self._put_record(record)
        # previous is None for a change of other fields than the state: no event for those,
        # except a change of the health status.
        if change.previous is not None or change.health_changed:
            await self._publish_event(change)

    async def _put_record(self, record: InstanceRecord) -> None:
        assert self._kv is not None
        value = encode(record)
        last = self._revisions.get(record.id)
        try:
            if last is None:
                revision = await self._kv.put(record.id, value)
            else:
                revision = await self._kv.update(record.id, value, last=last)
        except KeyWrongLastSequenceError:
            # Only this worker writes its instances' records; another writer means a
            # second worker runs with this host id. Say so loudly, then take the key back.
            log.error(
                "instance %s was changed by another writer; is VMFLEET_HOST_ID unique?", record.id
            )
            revision = await self._kv.put(record.id, value)
        self._revisions[record.id] = revision

    async def _publish_volume(self, change: _VolumeChange) -> None:
        assert self._volumes is not None
        if change.record is None:
            await self._volumes.delete(change.volume_id)
        else:
            await self._volumes.put(change.volume_id, encode(change.record))

    async def _delete_record(self, instance_id: str) -> None:
        assert self._kv is not None
        await self._kv.delete(instance_id)
        self._revisions.pop(instance_id, None)

    async def _publish_event(self, change: _Change) -> None:
        record = change.record
        self._seq[record.id] += 1
        event = StateEvent(
            instance_id=record.id,
            name=record.name,
            host=self._host_id,
            previous=record.state if change.health_changed else change.previous,
            state=record.state,
            error=record.state_error,
            at=utc_now(),
            seq=self._seq[record.id],
            command_id=record.last_command_id,
            deleted=change.deleted,
            kind="health" if change.health_changed else "state",
            health=record.health_status,
            cause=_transition_cause(change),
        )
        await self._js.publish(self._subjects.state(self._host_id, record.id), encode(event))


def _transition_cause(change: _Change) -> TransitionCause | None:
    """The cause of a standby's or a restore's steps (into or out of Paused, into Standby);
    the record carries it from the operation's first step."""
    if change.deleted or change.health_changed:
        return None
    record = change.record
    if record.state in (InstanceState.PAUSED, InstanceState.STANDBY):
        return record.cause
    return record.cause if change.previous is InstanceState.PAUSED else None


def _key(change: _Change | _VolumeChange) -> str:
    return change.volume_id if isinstance(change, _VolumeChange) else change.record.id


def _decoded(value: bytes, decode: Callable[[bytes], T]) -> T | None:
    try:
        return decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None  # a newer writer's record: not ours to judge
