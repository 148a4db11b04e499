"""A host's snapshots as the fleet sees them: each complete snapshot here has its record in
the KV bucket ``<p>_snapshots`` (key = snapshot id), written by this worker.

The record lists the hosts holding a copy, the host that took it first. Deleting removes
this host's copy, then this host's name from the record (the record itself once no host
is left). A worker's start writes the records of its snapshots that the bucket lacks (a
record lost with a crash between the rename and the put), and never overwrites one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import StateEvent
from schemas.snapshots import SnapshotManifest, SnapshotRecord
from worker.snapshots.store import SnapshotStore

__all__ = ["SnapshotService"]

log = logging.getLogger(__name__)

_UPDATE_ATTEMPTS = 5


#: Publishes one event on the states stream (the daemon's; None in tests of one host).
Emit = Callable[[StateEvent], Awaitable[None]]
#: The state an event names when its instance is not on this host (deleted, say).
StateOf = Callable[[str], InstanceState]


class SnapshotService:
    def __init__(
        self,
        store: SnapshotStore,
        kv: KeyValue | None,
        host_id: str,
        *,
        emit: Emit | None = None,
        state_of: StateOf = lambda instance_id: InstanceState.STOPPED,
    ) -> None:
        self.store = store
        self.kv = kv
        self.host_id = host_id
        self._emit = emit
        self._state_of = state_of

    async def event(
        self,
        kind: Literal["snapshot", "fork"],
        action: Literal["created", "deleted", "started", "finished", "failed"],
        *,
        instance_id: str,
        name: str,
        snapshot_id: str,
        source_instance_id: str,
        error: str | None = None,
        state: InstanceState | None = None,
    ) -> None:
        """One snapshot or fork event; a bus that refuses it costs the event, not the
        operation."""
        if self._emit is None:
            return
        event = StateEvent(
            instance_id=instance_id,
            name=name,
            host=self.host_id,
            state=state or self._state_of(instance_id),
            error=error,
            at=utc_now(),
            kind=kind,
            action=action,
            snapshot_id=snapshot_id,
            source_instance_id=source_instance_id,
        )
        try:
            await self._emit(event)
        except Exception as exc:
            log.warning("%s %s event of %s not published: %s", kind, action, instance_id, exc)

    async def publish(self, snapshot_id: str) -> SnapshotRecord:
        """The record of a snapshot just made here."""
        manifest = self.store.require(snapshot_id)
        record = SnapshotRecord.of(manifest, (self.host_id,))
        if self.kv is not None:
            await self.kv.put(snapshot_id, msgspec.json.encode(record))
        await self._snapshot_event(manifest, "created")
        return record

    async def _snapshot_event(
        self, manifest: SnapshotManifest, action: Literal["created", "deleted"]
    ) -> None:
        await self.event(
            "snapshot",
            action,
            instance_id=manifest.source.id,
            name=manifest.source.name,
            snapshot_id=manifest.id,
            source_instance_id=manifest.source.id,
        )

    async def delete(self, snapshot_id: str) -> None:
        """This host's copy and its name in the record; idempotent."""
        manifest = self.store.read(snapshot_id)
        self.store.remove(snapshot_id)
        if manifest is not None:
            await self._snapshot_event(manifest, "deleted")
        if self.kv is None:
            return
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                entry = await self.kv.get(snapshot_id)
            except KeyNotFoundError:
                return
            if entry.value is None:
                return
            record = msgspec.json.decode(entry.value, type=SnapshotRecord)
            hosts = tuple(h for h in record.hosts if h != self.host_id)
            try:
                if hosts:
                    updated = msgspec.structs.replace(record, hosts=hosts)
                    await self.kv.update(
                        snapshot_id, msgspec.json.encode(updated), last=entry.revision
                    )
                else:
                    await self.kv.delete(snapshot_id, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # another host changed it meanwhile: read it again
        log.warning("snapshot %s: its record kept changing; left as it is", snapshot_id)

    async def publish_missing(self) -> None:
        """At start: a record for every local snapshot the bucket has none of."""
        self.store.sweep_incomplete()
        if self.kv is None:
            return
        for manifest in self.store.list():
            await self._create_if_missing(manifest)

    async def _create_if_missing(self, manifest: SnapshotManifest) -> None:
        assert self.kv is not None
        record = SnapshotRecord.of(manifest, (self.host_id,))
        try:
            await self.kv.create(manifest.id, msgspec.json.encode(record))
        except KeyWrongLastSequenceError:
            pass  # it has one
        except Exception as exc:  # the bucket refusing must not stop the worker's start
            log.warning("snapshot %s: no record written: %s", manifest.id, exc)

    def owned_by(self, instance_id: str) -> list[SnapshotManifest]:
        return [m for m in self.store.list() if m.source.id == instance_id]
