"""A host's snapshots as the fleet sees them: each complete snapshot here has its record in
the KV bucket ``<p>_snapshots`` (key = snapshot id), written by this worker.

The record lists the hosts holding a copy, the host that took it first. Deleting removes
this host's copy, then this host's name from the record (the record itself once no host
is left). A worker's start writes the records of its snapshots that the bucket lacks (a
record lost with a crash between the rename and the put), and never overwrites one.
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.snapshots import SnapshotManifest, SnapshotRecord
from worker.snapshots.store import SnapshotStore

__all__ = ["SnapshotService"]

log = logging.getLogger(__name__)

_UPDATE_ATTEMPTS = 5


class SnapshotService:
    def __init__(self, store: SnapshotStore, kv: KeyValue | None, host_id: str) -> None:
        self.store = store
        self.kv = kv
        self.host_id = host_id

    async def publish(self, snapshot_id: str) -> SnapshotRecord:
        """The record of a snapshot just made here."""
        manifest = self.store.require(snapshot_id)
        record = SnapshotRecord.of(manifest, (self.host_id,))
        if self.kv is not None:
            await self.kv.put(snapshot_id, msgspec.json.encode(record))
        return record

    async def delete(self, snapshot_id: str) -> None:
        """This host's copy and its name in the record; idempotent."""
        self.store.remove(snapshot_id)
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
