"""Pulls the fleet asked for (``PullImage``): the image cache does the work, and the
image's record in the images bucket follows it, pending → pulling → converting → ready or
failed. The gateway created the record; the worker only moves it, each step an update on
the revision it read, and stops writing if the record is deleted meanwhile."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas.api import ImageStatus
from schemas.clock import utc_now
from schemas.codec import decode_image_record, encode
from schemas.errors import VmfleetError
from schemas.messages import DeleteImage, ImageRecord, PullImage
from schemas.subjects import image_key
from worker.images.cache import ImageCache
from worker.images.disk import ImageInfo

__all__ = ["ImagePuller"]

log = logging.getLogger(__name__)

_STATUSES = {s.value: s for s in ImageStatus}


class ImagePuller:
    def __init__(self, images: KeyValue, cache: ImageCache, host_id: str) -> None:
        self._kv = images
        self._cache = cache
        self._host_id = host_id

    async def pull(self, cmd: PullImage) -> ImageRecord:
        key = image_key(cmd.image)
        send, receive = anyio.create_memory_object_stream[tuple[ImageStatus, str | None]](math.inf)
        failure: VmfleetError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow, key, receive)
            with send:
                try:
                    info = await self._cache.pull(
                        cmd.image, on_status=lambda text: _forward(send.send_nowait, text)
                    )
                except VmfleetError as exc:
                    send.send_nowait((ImageStatus.FAILED, exc.message))
                    failure = exc
        # Raised outside the task group, so that callers see the error itself (not_found,
        # registry_unavailable, ...) rather than an exception group around it.
        if failure is not None:
            raise failure
        return await self._update(key, lambda r: _ready(r, info, self._host_id)) or _ready(
            _new_record(cmd.image), info, self._host_id
        )

    async def remove(self, cmd: DeleteImage, in_use: Callable[[str], bool]) -> None:
        """Drop the image's disk, tags and unshared blobs from this host; ``conflict`` while
        ``in_use(digest)`` (an instance here runs from it), ``not_found`` if it is not here."""
        await self._cache.delete(cmd.digest, in_use=in_use)

    async def _follow(
        self, key: str, statuses: MemoryObjectReceiveStream[tuple[ImageStatus, str | None]]
    ) -> None:
        async with statuses:
            async for status, error in statuses:
                await self._update(key, _with_status(status, error))

    async def _update(
        self, key: str, change: Callable[[ImageRecord], ImageRecord]
    ) -> ImageRecord | None:
        """Apply ``change`` to the record on the revision read; None if it is gone."""
        for _ in range(5):
            try:
                entry = await self._kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                return None
            if not entry.value:
                return None
            record = change(decode_image_record(entry.value))
            try:
                await self._kv.update(key, encode(record), last=entry.revision)
                return record
            except KeyWrongLastSequenceError:
                continue  # another host moved it meanwhile: read again
        log.warning("image record %s kept changing under us; left as is", key)
        return None


def _forward(send: Callable[[tuple[ImageStatus, str | None]], None], text: str) -> None:
    """The cache's status text (``pulling``, ``failed: <why>``) as a record status; ready is
    written once, with the image's details, after the pull returns."""
    word, _, detail = text.partition(":")
    status = _STATUSES.get(word.strip())
    if status is not None and status is not ImageStatus.READY:
        send((status, detail.strip() or None))


def _with_status(status: ImageStatus, error: str | None) -> Callable[[ImageRecord], ImageRecord]:
    return lambda record: msgspec.structs.replace(record, status=status, error=error)


def _ready(record: ImageRecord, info: ImageInfo, host_id: str) -> ImageRecord:
    return msgspec.structs.replace(
        record,
        status=ImageStatus.READY,
        digest=info.digest,
        error=None,
        queue_position=None,
        size_bytes=info.size_bytes,
        entrypoint=list(info.entrypoint),
        cmd=list(info.cmd),
        env=dict(info.env),
        working_dir=info.working_dir,
        hosts=sorted({*record.hosts, host_id}),
    )


def _new_record(name: str) -> ImageRecord:
    return ImageRecord(name=name, digest="", status=ImageStatus.PENDING, created_at=utc_now())
