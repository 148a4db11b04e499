"""``/images``: hypeman's asynchronous pull (``pending → pulling → converting → ready |
failed``), done by one host of the fleet.

One record per normalised name in the images bucket (key: ``schemas.subjects.image_key``).
``POST`` creates it ``pending`` with a KV *create*, so of several replicas asked at once
exactly one sends the pull; it goes as a ``PullImage`` command to the live host with the
most free disk, whose worker moves the record through the statuses (the contract is in
``docs/api.md``). A host that refuses the pull at once (unknown image, bad reference)
answers within ``image_early_answer_s``: the record is removed and the error returned,
as hypeman answers 404 without keeping anything. Other hosts pull on demand at create.

Names with ``/`` arrive percent-encoded (``docker.io%2Flibrary%2Falpine:latest``); the
server decodes the path, so ``{name:path}`` receives them whole.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ids import new_id
from gateway.requests import decode_body, normalize_image, read_body
from gateway.responses import MsgspecResponse
from gateway.service import Gateway, gateway
from schemas.api import ImageStatus
from schemas.clock import utc_now
from schemas.codec import decode_create_image_request, encode
from schemas.errors import BadRequest, NotFound, OpTimeout, VmfleetError
from schemas.messages import DeleteImage, ImageRecord, PullImage
from schemas.subjects import image_key

__all__ = ["routes"]

log = logging.getLogger(__name__)


async def list_images(request: Request) -> Response:
    """Ready images, by name (hypeman lists only tags whose build finished)."""
    view = gateway(request).view
    ready = [r for r in view.images.values() if r.status is ImageStatus.READY]
    return MsgspecResponse([r.to_api() for r in sorted(ready, key=lambda r: r.name)])


async def get_image(request: Request) -> Response:
    return MsgspecResponse(_find(gateway(request), request.path_params["name"]).to_api())


async def delete_image(request: Request) -> Response:
    """Forget the name, or every name of a ``repo@sha256:…`` reference's digest (hypeman
    removes the tag); then a digest that no name refers to any more is removed from the
    hosts that have it."""
    gw = gateway(request)
    forgotten = _records_of(gw, request.path_params["name"])
    keys = {image_key(record.name) for record in forgotten}
    kv = await gw.js.key_value(gw.subjects.images_bucket)
    for key in keys:
        await kv.delete(key)
    await gw.view.wait_until(lambda: keys.isdisjoint(gw.view.images), 2.0)
    named = {record.digest for record in gw.view.images.values()}
    for digest in sorted({r.digest for r in forgotten if r.digest} - named):
        pulled_by = {host for r in forgotten if r.digest == digest for host in r.hosts}
        await _remove_from_hosts(gw, digest, pulled_by)
    return Response(status_code=204)


async def _remove_from_hosts(gw: Gateway, digest: str, pulled_by: set[str]) -> None:
    """Ask every live host that has the image (it pulled it for the record, or its
    heartbeat lists it) to drop its disk. The names are gone already, so a host's refusal
    (an instance there runs from the image) is logged, not answered."""

    async def remove(host: str) -> None:
        cmd = DeleteImage(id=new_id(), issued_at=utc_now(), digest=digest)
        try:
            await gw.execute(host, cmd)
        except NotFound:
            pass  # the host dropped it meanwhile
        except VmfleetError as exc:
            log.warning("image %s stays on host %s: %s", digest, host, exc.message)

    async with anyio.create_task_group() as tg:
        for host in gw.view.live_hosts():
            if host.id in pulled_by or digest in host.images:
                tg.start_soon(remove, host.id)


async def create_image(request: Request) -> Response:
    """202 with the record: the existing one, or a new ``pending`` one whose pull is sent."""
    gw = gateway(request)
    body = await read_body(request, gw.config.max_json_body_bytes)
    name = normalize_image(decode_body(decode_create_image_request, body).name)
    key = image_key(name)
    existing = gw.view.images.get(key)
    if existing is not None:
        return MsgspecResponse(existing.to_api(), status_code=202)
    host = gw.placement.image_host()
    record = ImageRecord(name=name, digest="", status=ImageStatus.PENDING, created_at=utc_now())
    kv = await gw.js.key_value(gw.subjects.images_bucket)
    try:
        revision = await kv.create(key, encode(record))
    except KeyWrongLastSequenceError:  # another replica created it a moment ago
        found = await gw.view.wait_until(lambda: gw.view.images.get(key), 2.0)
        return MsgspecResponse((found or record).to_api(), status_code=202)
    return MsgspecResponse(await _pull(gw, host, key, record, revision), status_code=202)


async def _pull(gw: Gateway, host: str, key: str, record: ImageRecord, revision: int) -> object:
    cmd = PullImage(id=new_id(), issued_at=utc_now(), image=record.name)
    try:
        result = await gw.execute(host, cmd, timeout_s=gw.config.image_early_answer_s)
    except OpTimeout:  # pulling takes a while: the host reports progress in the record
        return (gw.view.images.get(key) or record).to_api()
    except VmfleetError:
        kv = await gw.js.key_value(gw.subjects.images_bucket)
        with contextlib.suppress(Exception):  # only if the host has not written to it
            await kv.delete(key, last=revision)
        raise
    return (result.image or gw.view.images.get(key) or record).to_api()


def _find(gw: Gateway, raw: str) -> ImageRecord:
    """The record of a name, or of a ``repo@digest`` reference to a pulled tag's digest."""
    found = _records_of(gw, raw)[0]
    name = normalize_image(raw)
    return found if image_key(found.name) == image_key(name) else _renamed(found, name)


def _records_of(gw: Gateway, raw: str) -> list[ImageRecord]:
    """The record of a name; for ``repo@digest``, every record of the repository's tags
    that resolved to that digest. 404 if there is none."""
    try:
        name = normalize_image(raw)
    except BadRequest:
        raise BadRequest("invalid image reference", code="invalid_name") from None
    record = gw.view.images.get(image_key(name))
    if record is not None:
        return [record]
    repository, _, digest = name.partition("@")
    found = [
        candidate
        for candidate in gw.view.images.values()
        if digest
        and candidate.digest == digest
        and _repository(candidate.name) == _repository(repository)
    ]
    if not found:
        raise NotFound("image not found")
    return sorted(found, key=lambda r: r.name)


def _renamed(record: ImageRecord, name: str) -> ImageRecord:
    return msgspec.structs.replace(record, name=name)


def _repository(name: str) -> str:
    """``registry/repo`` of a normalised name, without tag or digest."""
    base = name.partition("@")[0]
    slash, colon = base.rfind("/"), base.rfind(":")
    return base[:colon] if colon > slash else base


routes = [
    Route("/images", list_images, methods=["GET"]),
    Route("/images", create_image, methods=["POST"]),
    Route("/images/{name:path}", get_image, methods=["GET"]),
    Route("/images/{name:path}", delete_image, methods=["DELETE"]),
]
