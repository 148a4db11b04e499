"""A snapshot forked on a host that does not have it: sent once, fetched once per host.

The host holding the snapshot uploads its directory as the bundle ``snap-<id>`` (once:
a bundle already complete in the store is not sent again). The host the fork is placed
on fetches it into its transfer cache (once, however many forks ask at the same time;
verified file by file) and makes it a snapshot of its own under ``<data>/snapshots/<id>``:
a symbolic link into the cache, so the cache's disk budget covers it. Forks never need
it after they start (their layers are hard links of its disks and the memory file is
read at restore only), so the cache may evict it: the link then dangles, the host reads
as not having the snapshot, and the next fork there fetches it again. The host adds
itself to the snapshot's record (``hosts``), with a revision check, so a concurrent
update by another host is never lost.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas.messages import FetchSnapshot, PublishSnapshot
from schemas.snapshots import SnapshotRecord
from worker.drivers.base import VmSpec
from worker.snapshots.store import VM_DIR, SnapshotStore
from worker.transfer.cache import HostCache
from worker.transfer.names import SHIPPED_DISKS
from worker.transfer.upload import upload_bundle

__all__ = ["SnapshotTransfers"]

log = logging.getLogger(__name__)

_UPDATE_ATTEMPTS = 5


def _shipped(directory: Path) -> dict[str, Path]:
    """The image disk a saved VM ran on goes with it: each host builds an image's disk
    itself (mkfs), so another host's disk of the same image is not the same bytes, and
    the saved guest's page cache holds blocks of this one. A snapshot without memory
    (kind Stopped) boots afresh on any host's disk: nothing to ship."""
    shipped = directory / SHIPPED_DISKS / "root.ext4"
    if shipped.exists():  # fetched from another host: its disk travels on
        return {f"{SHIPPED_DISKS}/root.ext4": shipped}
    saved = directory / VM_DIR / "vm.json"
    if not saved.exists():
        return {}
    spec = msgspec.json.decode(saved.read_bytes(), type=VmSpec)
    root = next((d for d in spec.disks if d.id == "root"), None)
    return {f"{SHIPPED_DISKS}/root.ext4": Path(root.path)} if root else {}


class SnapshotTransfers:
    def __init__(
        self,
        store: ObjectStore,
        cache: HostCache,
        snapshots: SnapshotStore,
        records: KeyValue | None,
        host_id: str,
    ) -> None:
        self.store = store
        self.cache = cache
        self.snapshots = snapshots
        self.records = records
        self.host_id = host_id

    async def publish(self, cmd: PublishSnapshot) -> None:
        self.snapshots.require(cmd.snapshot_id)  # 404 when this host has no copy
        directory = self.snapshots.directory(cmd.snapshot_id).resolve()  # a fetched copy too
        stats = await upload_bundle(
            self.store,
            cmd.bundle,
            directory,
            exclude=frozenset({SHIPPED_DISKS}),
            extra=_shipped(directory),
        )
        self.cache.observe("sent", stats.bytes_sent, stats.seconds)
        if stats.bytes_sent:
            log.info(
                "snapshot %s sent for a fork on another host: %d bytes in %.2fs",
                cmd.snapshot_id,
                stats.bytes_sent,
                stats.seconds,
            )

    async def fetch(self, cmd: FetchSnapshot) -> None:
        if self.snapshots.read(cmd.snapshot_id) is None:
            fetched = await self.cache.fetch(cmd.bundle)
            self._link(cmd.snapshot_id, str(fetched))
            self.snapshots.require(cmd.snapshot_id)  # the bundle was that snapshot's
        elif self.cache.has(cmd.bundle):
            await self.cache.fetch(cmd.bundle)  # here already: counts as a use (LRU)
        await self._list_this_host(cmd.snapshot_id)

    def _link(self, snapshot_id: str, fetched: str) -> None:
        """``<data>/snapshots/<id>`` -> the cache's copy, in one rename."""
        place = self.snapshots.directory(snapshot_id)
        place.parent.mkdir(parents=True, exist_ok=True)
        if place.is_dir() and not place.is_symlink():
            shutil.rmtree(place)  # an incomplete copy (no manifest): never used
        link = place.with_name(f".{snapshot_id}.link")
        link.unlink(missing_ok=True)
        os.symlink(fetched, link)
        os.replace(link, place)

    async def _list_this_host(self, snapshot_id: str) -> None:
        if self.records is None:
            return
        for _ in range(_UPDATE_ATTEMPTS):
            try:
                entry = await self.records.get(snapshot_id)
            except KeyNotFoundError:
                return  # deleted meanwhile: its copies go with the delete
            if entry.value is None:
                return
            record = msgspec.json.decode(entry.value, type=SnapshotRecord)
            if self.host_id in record.hosts:
                return
            updated = msgspec.structs.replace(record, hosts=(*record.hosts, self.host_id))
            try:
                await self.records.update(
                    snapshot_id, msgspec.json.encode(updated), last=entry.revision
                )
                return
            except KeyWrongLastSequenceError:
                continue
        log.warning("snapshot %s: its record kept changing; this host not listed", snapshot_id)
