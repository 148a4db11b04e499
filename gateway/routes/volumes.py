"""``/volumes``: ext4 volumes, each on one host (the one with the most free disk), empty
or made from a tar.gz (``gateway/archives.py``).

A volume lives where its data file is; instances that mount it run on that host. Its
record (``host`` included) is written by that host's worker.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.archives import (
    ArchiveUpload,
    discard_archive,
    read_multipart,
    read_raw_archive,
    store_archive,
)
from gateway.ids import new_id
from gateway.requests import decode_body, idempotency_key, read_body
from gateway.resolve import resolve_volume
from gateway.responses import MsgspecResponse
from gateway.service import Gateway, gateway
from schemas.clock import utc_now
from schemas.codec import decode_create_volume_request
from schemas.errors import Conflict, OpTimeout, VmfleetError
from schemas.messages import CreateVolume, DeleteVolume
from schemas.sizes import GIB

__all__ = ["routes"]


async def list_volumes(request: Request) -> Response:
    view = gateway(request).view
    return MsgspecResponse([view.volumes[key].to_api() for key in sorted(view.volumes)])


async def get_volume(request: Request) -> Response:
    return MsgspecResponse(
        resolve_volume(gateway(request).view, request.path_params["id"]).to_api()
    )


async def create_volume(request: Request) -> Response:
    """JSON ``{name, size_gb, id?}`` → an empty volume; multipart → one from its archive."""
    gw = gateway(request)
    if request.headers.get("content-type", "").startswith("multipart/"):
        return await _from_archive(gw, request, await read_multipart(gw, request))
    req = decode_body(
        decode_create_volume_request, await read_body(request, gw.config.max_json_body_bytes)
    )
    volume_id = _free_id(gw, req.id if isinstance(req.id, str) else None)
    cmd = _command(request, volume_id, req.name, req.size_gb, archive=None)
    return await _create(gw, gw.placement.volume_host(req.size_gb * GIB), cmd)


async def create_volume_from_archive(request: Request) -> Response:
    """The newer SDK's upload: fields in the query, the tar.gz as the body."""
    gw = gateway(request)
    return await _from_archive(gw, request, await read_raw_archive(request))


async def _from_archive(gw: Gateway, request: Request, upload: ArchiveUpload) -> Response:
    """Checks and placement first, so a refused upload is never stored; the stored archive
    is removed again if the host refuses it (not on a 504: the queued command needs it)."""
    try:
        volume_id = _free_id(gw, upload.volume_id)
        host = gw.placement.volume_host(upload.size_gb * GIB)
    except VmfleetError:
        upload.file.close()
        raise
    archive = await store_archive(gw, upload)
    cmd = _command(request, volume_id, upload.name, upload.size_gb, archive=archive)
    try:
        return await _create(gw, host, cmd)
    except OpTimeout:
        raise
    except VmfleetError:
        await discard_archive(gw, archive)
        raise


def _free_id(gw: Gateway, requested: str | None) -> str:
    volume_id = requested or new_id()
    if volume_id in gw.view.volumes:
        raise Conflict("volume with this ID already exists", code="already_exists")
    return volume_id


def _command(
    request: Request, volume_id: str, name: str, size_gb: int, *, archive: str | None
) -> CreateVolume:
    return CreateVolume(
        id=idempotency_key(request) or new_id(),
        issued_at=utc_now(),
        volume_id=volume_id,
        name=name,
        size_gb=size_gb,
        archive=archive,
    )


async def _create(gw: Gateway, host: str, cmd: CreateVolume) -> Response:
    """Send CreateVolume, answer 201 with the record its host wrote."""
    volume_id = cmd.volume_id
    result = await gw.execute(host, cmd, settled=lambda: volume_id in gw.view.volumes)
    record = result.volume or gw.view.volumes.get(volume_id)
    if record is None:
        raise VmfleetError(f"host {host} created volume {volume_id} but reported no record")
    return MsgspecResponse(record.to_api(), status_code=201)


async def delete_volume(request: Request) -> Response:
    """Refused (409) while attached; otherwise removed on its host."""
    gw = gateway(request)
    record = resolve_volume(gw.view, request.path_params["id"])
    if record.attachments:
        raise Conflict("volume is in use by an instance")
    if record.host is None:
        raise Conflict(f"volume {record.id} has no host yet")
    cmd = DeleteVolume(
        id=idempotency_key(request) or new_id(), issued_at=utc_now(), volume_id=record.id
    )
    await gw.execute(record.host, cmd, settled=lambda: record.id not in gw.view.volumes)
    return Response(status_code=204)


routes = [
    Route("/volumes", list_volumes, methods=["GET"]),
    Route("/volumes", create_volume, methods=["POST"]),
    Route("/volumes/from-archive", create_volume_from_archive, methods=["POST"]),
    Route("/volumes/{id}", get_volume, methods=["GET"]),
    Route("/volumes/{id}", delete_volume, methods=["DELETE"]),
]
