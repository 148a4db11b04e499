"""Volumes made from a tar.gz: hypeman's multipart ``POST /volumes`` and the newer SDK's
``POST /volumes/from-archive?name=&size_gb=`` with a raw gzip body.

A command payload is limited to 1 MB, so the archive travels through the archives object
store: the gateway spools the upload to a temporary file (bounded: an archive larger
than ``size_gb`` GiB is a 413, as is any multipart body over ``max_archive_bytes``), puts
it in the store under a fresh name, and sends ``CreateVolume(archive=name)``; the worker
extracts it within ``size_gb`` (400 ``archive_too_large`` otherwise, hypeman's code) and
deletes the object. An upload no worker takes ages out of the store.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from typing import IO, Final

from python_multipart.exceptions import FormParserError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from gateway.ids import new_id
from gateway.service import Gateway
from schemas.api import VOLUME_ID_PATTERN
from schemas.errors import BadRequest, PayloadTooLarge
from schemas.sizes import GIB

__all__ = [
    "ArchiveUpload",
    "discard_archive",
    "read_multipart",
    "read_raw_archive",
    "store_archive",
]

_SPOOL_BYTES: Final = 8 << 20


class ArchiveUpload:
    """A checked upload: the volume's fields and the spooled archive."""

    def __init__(self, name: str, size_gb: int, volume_id: str | None, file: IO[bytes]) -> None:
        self.name = name
        self.size_gb = size_gb
        self.volume_id = volume_id
        self.file = file


async def read_raw_archive(request: Request) -> ArchiveUpload:
    """``/volumes/from-archive``: fields in the query, the gzip as the body."""
    query = request.query_params
    name = _required(query.get("name"), "name")
    size_gb = _size_gb(_required(query.get("size_gb"), "size_gb"))
    volume_id = _volume_id(query.get("id"))
    limit = size_gb * GIB
    _check_declared_length(request, limit)
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - handed on
    try:
        async for chunk in _limited(request.stream(), limit):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    if spool.tell() == 0:
        spool.close()
        raise BadRequest("request body is required", code="invalid_request")
    spool.seek(0)
    return ArchiveUpload(name, size_gb, volume_id, spool)


async def read_multipart(gw: Gateway, request: Request) -> ArchiveUpload:
    """hypeman's form: ``name``, ``size_gb``, optional ``id``, and the ``content`` file."""
    limit = gw.config.max_archive_bytes
    _check_declared_length(request, limit)
    parser = MultiPartParser(
        request.headers, _limited(request.stream(), limit), max_files=1, max_fields=8
    )
    try:
        form = await parser.parse()
    except (MultiPartException, FormParserError, ValueError) as exc:
        raise BadRequest(f"invalid multipart form: {exc}", code="invalid_form") from None
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    content = form.get("content")
    name = _required(fields.get("name"), "name")
    size_gb = _size_gb(_required(fields.get("size_gb"), "size_gb"))
    volume_id = _volume_id(fields.get("id"))
    if not isinstance(content, UploadFile):
        raise BadRequest("content file is required for multipart requests", code="missing_file")
    if (content.size or 0) > size_gb * GIB:
        await content.close()
        raise PayloadTooLarge(f"the archive is larger than size_gb ({size_gb} GiB)")
    await content.seek(0)
    return ArchiveUpload(name, size_gb, volume_id, content.file)


async def store_archive(gw: Gateway, upload: ArchiveUpload) -> str:
    """Put the archive in the object store; its name there goes into the command."""
    store = await gw.js.object_store(gw.subjects.archives_bucket)
    name = f"upload-{new_id()}"
    try:
        await store.put(name, upload.file)  # type: ignore[arg-type]
    finally:
        upload.file.close()
    return name


async def discard_archive(gw: Gateway, name: str) -> None:
    """Remove a stored archive no worker will take (best effort: it ages out anyway)."""
    store = await gw.js.object_store(gw.subjects.archives_bucket)
    with contextlib.suppress(Exception):
        await store.delete(name)


def _required(value: str | None, field: str) -> str:
    if value is None or value == "":
        raise BadRequest(f"{field} is required", code="missing_field")
    return value


def _size_gb(raw: str) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
        raise BadRequest("size_gb must be a positive integer", code="invalid_field")
    return int(raw)


def _volume_id(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if not re.fullmatch(VOLUME_ID_PATTERN, raw):
        raise BadRequest(
            "id must be 1-63 letters, digits, '_' or '-', starting with a letter or digit",
            code="invalid_field",
        )
    return raw


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")


async def _limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks, failing with 413 as soon as more than ``limit`` bytes came."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        yield chunk
