"""Opening the fleet's transfers store, and removing a bundle from it."""

from __future__ import annotations

import contextlib

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from schemas.subjects import Subjects
from worker.transfer.names import manifest_object, part_object
from worker.transfer.upload import read_manifest

__all__ = ["delete_bundle", "open_store"]


async def open_store(js: JetStreamContext, subjects: Subjects) -> ObjectStore:
    """The transfers object store (created by ``natsbus.provision``)."""
    return await js.object_store(subjects.transfers_bucket)


async def delete_bundle(store: ObjectStore, bundle: str) -> None:
    """Remove the bundle's manifest first (so no host starts fetching it), then its parts.
    A bundle already gone is fine: moves delete theirs when done, and retried deletes
    must not fail."""
    manifest = await read_manifest(store, bundle)
    if manifest is None:
        return
    await _delete(store, manifest_object(bundle))
    for file_index, f in enumerate(manifest.files):
        zeros = set(f.zero_parts)
        for part_index in range(len(f.parts)):
            if part_index not in zeros:
                await _delete(store, part_object(bundle, file_index, part_index))


async def _delete(store: ObjectStore, name: str) -> None:
    with contextlib.suppress(NotFoundError):
        await store.delete(name)
