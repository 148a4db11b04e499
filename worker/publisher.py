"""Pushing this host's records to NATS: instance records to KV, transitions to the states
stream, in the order they happened.

Operations record changes locally first (metadata.json) and enqueue them here without
waiting, so a NATS outage never fails an operation half-way; the publisher retries until
NATS is back. A command is acknowledged only after :meth:`RecordPublisher.flush`, so a
client never sees "done" before the fleet can read the outcome.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.codec import decode_instance_record, decode_volume_record, encode
from schemas.messages import InstanceRecord, StateEvent, VolumeRecord
from schemas.subjects import Subjects

__all__ = ["RecordPublisher"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Change:
    record: InstanceRecord
    previous: InstanceState | None
    deleted: bool = False


@dataclass(frozen=True)
class _VolumeChange:
    volume_id: str
    record: VolumeRecord | None


@dataclass(frozen=True)
class _Flush:
    done: anyio.Event


class RecordPublisher:
    def __init__(self, js: JetStreamContext, subjects: Subjects, host_id: str) -> None:
        self._js = js
        self._subjects = subjects
        self._host_id = host_id
        self._send, self._receive = anyio.create_memory_object_stream[
            _Change | _VolumeChange | _Flush
        ](math.inf)
        self._revisions: dict[str, int] = {}
        self._seq: defaultdict[str, int] = defaultdict(int)
        self._kv: KeyValue | None = None
        self._scope = anyio.CancelScope(shield=True)
        self._volumes: KeyValue | None = None

    def changed(self, record: InstanceRecord, previous: InstanceState | None) -> None:
        self._enqueue(_Change(record, previous))

    def deleted(self, record: InstanceRecord) -> None:
        self._enqueue(_Change(record, record.state, deleted=True))

    def volume_changed(self, volume_id: str, record: VolumeRecord | None) -> None:
        self._enqueue(_VolumeChange(volume_id, record))

    def _enqueue(self, item: _Change | _VolumeChange) -> None:
        try:
            self._send.send_nowait(item)
        except anyio.ClosedResourceError:
            # After shutdown the local files hold the change; the next worker publishes it.
            log.warning("publisher stopped; %s left for the next worker to publish", item)

    async def flush(self) -> None:
        """Return once every change enqueued before this call is in NATS."""
        done = anyio.Event()
        self._send.send_nowait(_Flush(done))
        await done.wait()

    async def forget_vanished(self, instances: set[str], volumes: set[str]) -> None:
        """Delete this host's records of instances and volumes that are no longer on disk.

        A worker killed between removing an instance's files and publishing the removal
        leaves a record of something that no longer exists; at start, before any command
        runs, this host's truth is what is on disk. Records of other hosts are left alone.
        """
        assert self._kv is not None and self._volumes is not None
        for key, value in await _entries(self._kv):
            if key not in instances:
                record = _decoded(value, decode_instance_record)
                if record is not None and record.host == self._host_id:
                    log.warning("instance %s is no longer on this host: record removed", key)
                    self.deleted(record)
        for key, value in await _entries(self._volumes):
            if key not in volumes:
                volume = _decoded(value, decode_volume_record)
                if volume is not None and volume.host == self._host_id:
                    log.warning("volume %s is no longer on this host: record removed", key)
                    self.volume_changed(key, None)
        await self.flush()

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
        delay = 0.2
        while True:
            try:
                with anyio.fail_after(10):
                    await self._publish(change)
                return
            except Exception as exc:
                log.warning("publishing %s failed (%s); retrying", change, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _publish(self, change: _Change | _VolumeChange) -> None:
        if isinstance(change, _VolumeChange):
            await self._publish_volume(change)
            return
        record = change.record
        if change.deleted:
            await self._delete_record(record.id)
        else:
            await self._put_record(record)
        # previous is None for a change of other fields than the state: no event for those.
        if change.previous is not None:
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
            previous=change.previous,
            state=record.state,
            error=record.state_error,
            at=utc_now(),
            seq=self._seq[record.id],
            command_id=record.last_command_id,
            deleted=change.deleted,
        )
        await self._js.publish(self._subjects.state(self._host_id, record.id), encode(event))


async def _entries(kv: KeyValue) -> list[tuple[str, bytes]]:
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    entries = []
    for key in keys:
        with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
            entry = await kv.get(key)
            if entry.value:
                entries.append((key, entry.value))
    return entries


def _decoded(value: bytes, decode: Callable[[bytes], T]) -> T | None:
    try:
        return decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None  # a newer writer's record: not ours to judge
