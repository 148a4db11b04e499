"""The HTTP edge: who may call, what a request may name, and how big it may be.

* **Tokens.** Every operation of the served description except the public ones needs a
  valid HS256 token. The operations are read from ``GET /spec.json`` (and
  ``tests/gateway/test_spec.py`` checks that it lists every route the app serves), so a
  new route is in this sweep the day it exists. Missing, malformed, wrongly signed,
  tampered, expired, not-yet-valid, ``alg: none``, never-expiring and foreign tokens are
  each a 401 ``Unauthorized`` in the error shape. The reason texts are checked once, on one
  route, in ``tests/gateway/test_auth.py``.
* **Paths.** Nothing a request names becomes a path outside where it belongs: archive
  entries (``..``, absolute, symlinks and hard links leading out, device nodes) are refused
  by the worker that extracts them (``worker/volumes.py``), so those run against a real
  ``vmfleet worker`` (no guest is booted); mount paths are checked by the worker too
  (``worker/lifecycle/mounts.py``); image references and ids by the gateway. Each refusal is
  a 4xx in the error shape, and nothing is created: no record in the fleet's buckets, no
  archive left in the object store, no directory on the host.
* **Sizes.** JSON bodies over 1 MiB are 413 on every route that reads one (honest, chunked
  and lying ``Content-Length``); archives over their limit are 413 (by header:
  ``tests/gateway/test_bad_input.py::test_raw_archive_upload_is_checked_and_bounded``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import secrets
import socket
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import anyio
import httpx
import jwt
import nats
import pytest
from nats.js.errors import NotFoundError

import gateway.archives
from gateway.auth import PUBLIC_PATHS
from natsbus import live_entries
from schemas.messages import DrainRecord, VolumeRecord
from schemas.subjects import Subjects
from tests.support.fleet import WorkerProcess
from tests.support.gateway import SECRET, Bus, GatewayHandle, instance_record, running_gateway

MIB: Final = 1 << 20
#: The routes anyone may call; ``/ui`` (off by default, not in the description) is public
#: too when turned on (tests/gateway/test_ui.py).
PUBLIC: Final = frozenset({"/health", "/ready", "/spec.yaml", "/spec.json", "/metrics"})


# -- fleets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    nats_url: str
    prefix: str
    api: GatewayHandle
    worker: WorkerProcess | None = None


@pytest.fixture(scope="module")
def hostless(nats_url: str) -> Iterator[Fleet]:
    """No host: a request that passes every check is 503 ``no_capacity``."""
    prefix = "s" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix) as api:
        yield Fleet(nats_url, prefix, api)


@pytest.fixture(scope="module")
def with_worker(nats_url: str, test_assets: Path) -> Iterator[Fleet]:
    """A real worker (it extracts archives and checks mount paths); no guest is booted."""
    prefix = "s" + secrets.token_hex(4)
    worker = WorkerProcess(nats_url, prefix, test_assets)
    worker.start()
    try:
        # Placement counts a create against its host until the next heartbeat (5 s), even
        # one the host refused: room for the quick refused creates of the mount test.
        with running_gateway(nats_url, prefix, cpu_overcommit=64.0) as api:
            deadline = time.monotonic() + 120
            with api.client() as client:
                while not any(h["id"] == worker.host_id for h in client.get("/hosts").json()):
                    assert time.monotonic() < deadline, "the worker never showed up"
                    time.sleep(0.1)
            yield Fleet(nats_url, prefix, api, worker)
    finally:
        worker.cleanup()


def stored(fleet: Fleet) -> dict[str, list[str]]:
    """Keys of the buckets a request could write, and live objects of the archives store."""

    async def read() -> dict[str, list[str]]:
        s = Subjects(fleet.prefix)
        nc = await nats.connect(fleet.nats_url)
        try:
            js = nc.jetstream()
            found: dict[str, list[str]] = {}
            for bucket in (s.instances_bucket, s.volumes_bucket, s.images_bucket):
                found[bucket] = sorted(key for key, _ in await live_entries(js, bucket))
            store = await js.object_store(s.archives_bucket)
            try:
                objects = await store.list(ignore_deletes=True)
            except NotFoundError:  # raised when the store holds nothing
                objects = []
            found["archives"] = sorted(o.name for o in objects if not o.deleted)
            return found
        finally:
            await nc.close()

    return anyio.run(read)


def assert_nothing_stored(fleet: Fleet, *, volumes: tuple[str, ...] = ()) -> None:
    """No instance, image or archive; no volume but ``volumes`` (made by the test itself)."""
    found = stored(fleet)
    s = Subjects(fleet.prefix)
    assert found[s.instances_bucket] == [], found
    assert found[s.images_bucket] == [], found
    assert found[s.volumes_bucket] == sorted(volumes), found
    assert found["archives"] == [], found


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"code", "message"} and isinstance(body["message"], str), body
    if code is not None:
        assert body["code"] == code, body


# -- tokens -------------------------------------------------------------------------------------


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": "attacker", "iat": now, "exp": now + 3600, **extra}


def _signed(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _tampered() -> str:
    """A valid token whose payload was swapped for another after signing."""
    header, _, signature = _signed(_claims()).split(".")
    return f"{header}.{_b64(_claims(sub='admin'))}.{signature}"


def _bad_authorization() -> dict[str, str | None]:
    now = int(time.time())
    valid = _signed(_claims())
    return {
        "missing": None,
        "empty": "",
        "not bearer": f"Basic {base64.b64encode(b'admin:admin').decode()}",
        "bearer without token": "Bearer",
        "not a JWT": "Bearer not-a-jwt",
        "three garbage parts": "Bearer a.b.c",
        "no signature": "Bearer " + valid.rsplit(".", 1)[0],
        "raw token, no scheme": valid,
        "wrong secret": "Bearer " + _signed(_claims(), "another-secret-0123456789abcdef-0123"),
        "tampered payload": "Bearer " + _tampered(),
        "expired": "Bearer " + _signed(_claims(exp=now - 5)),
        "not yet valid": "Bearer " + _signed(_claims(nbf=now + 600)),
        "alg none": "Bearer " + f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.",
        "alg none, signed part kept": "Bearer "
        + f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.{valid.rsplit('.', 1)[1]}",
        "RS256 header": "Bearer " + f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(_claims())}.AA",
        "never expires": "Bearer " + _signed({"sub": "attacker", "iat": now}),
        "exp not a number": "Bearer " + _signed(_claims(exp="never")),
        "minted for a registry push": "Bearer " + _signed(_claims(scope="repository:x:push")),
    }


def _described_operations() -> list[tuple[str, str]]:
    """(method, path) of every operation ``GET /spec.json`` describes, read without NATS."""
    from gateway import GatewayConfig, create_app
    from natsbus import BusOptions

    app = create_app(GatewayConfig(bus=BusOptions(urls=("nats://127.0.0.1:1",)), jwt_secret=SECRET))

    async def get() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            description: dict[str, Any] = (await client.get("/spec.json")).json()
            return description

    paths = anyio.run(get)["paths"]
    return sorted(
        (method.upper(), path)
        for path, operations in paths.items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    )


OPERATIONS: Final = _described_operations()
GUARDED: Final = [(m, p) for m, p in OPERATIONS if p not in PUBLIC]


def _concrete(path: str) -> str:
    return path.replace("{id}", "x1").replace("{volumeId}", "v1").replace("{name}", "alpine")


def test_the_public_routes_are_exactly_these() -> None:
    """Making a route public is a decision this test has to be told about."""
    assert PUBLIC_PATHS == PUBLIC
    assert {p for _, p in OPERATIONS} >= PUBLIC
    assert len(GUARDED) >= 25  # the sweep below really covers the API


def test_the_swept_operations_are_the_served_ones(hostless: Fleet) -> None:
    with hostless.api.client() as client:
        served = client.get("/spec.json").json()["paths"]
    assert sorted(
        (m.upper(), p) for p, ops in served.items() for m in ops if m != "parameters"
    ) == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_every_guarded_operation_refuses_every_bad_token(
    hostless: Fleet, method: str, path: str
) -> None:
    with httpx.Client(base_url=hostless.api.base_url, timeout=10) as client:
        # Minted now, not at import: "not yet valid" must still be in the future when sent.
        for kind, authorization in _bad_authorization().items():
            headers = {} if authorization is None else {"Authorization": authorization}
            response = client.request(method, _concrete(path), headers=headers, json={})
            assert response.status_code == 401, (kind, response.status_code, response.text)
            body = response.json()
            assert body["code"] == "Unauthorized", (kind, body)
            assert body["message"].startswith("security requirements failed: "), (kind, body)
            assert response.headers["x-should-retry"] == "false", kind
    assert_nothing_stored(hostless)


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_a_valid_token_gets_past_the_check(hostless: Fleet, method: str, path: str) -> None:
    """The counter-test: the same requests with a good token reach the route (so the 401
    above came from the token, not from the request)."""
    with (
        hostless.api.client() as client,
        client.stream(method, _concrete(path), json={}, timeout=10) as response,
    ):
        assert response.status_code != 401, (method, path)


@pytest.mark.parametrize(
    "target",
    [
        "/instances",  # HEAD of a GET route
        "/no-such-route",
        "/health/",
        "/health/../instances",
        "/spec.json/../instances",
        "/%68ealth/../instances",
        "/ui/../instances",
    ],
)
def test_no_path_spelling_skips_the_check(hostless: Fleet, target: str) -> None:
    """The raw request line, as sent (httpx would resolve the dots): only the exact
    public paths are public, and ``/ui`` (off here) is a 404 that serves nothing."""
    method = "HEAD" if target == "/instances" else "GET"
    status, _, body = raw_request(hostless.api, f"{method} {target} HTTP/1.1\r\n".encode())
    if target.startswith("/ui/"):
        assert status == 404 and json.loads(body)["code"] == "not_found"
    else:
        assert status == 401, (target, status, body)


# -- paths: archives ------------------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tar_gz(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    """A tar.gz of ``members``; regular files hold ``data`` unless their size says more
    (then only the header is written: the content check must refuse it unread)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in members:
            if info.isreg() and info.size == 0:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


UNSAFE_ARCHIVES: Final = {
    "dot-dot entry": tar_gz(_member("../vmfleet-escape.txt")),
    "nested dot-dot entry": tar_gz(_member("dir/../../vmfleet-escape.txt")),
    "absolute entry": tar_gz(_member("/etc/vmfleet-escape.txt")),
    "symlink to an absolute path": tar_gz(_member("link", tarfile.SYMTYPE, linkname="/etc")),
    "symlink leading out": tar_gz(_member("link", tarfile.SYMTYPE, linkname="../../..")),
    "symlink in a dir leading out": tar_gz(
        _member("dir", tarfile.DIRTYPE), _member("dir/link", tarfile.SYMTYPE, linkname="../..")
    ),
    "hard link to an absolute path": tar_gz(_member("hl", tarfile.LNKTYPE, linkname="/etc/passwd")),
    "hard link leading out": tar_gz(
        _member("hl", tarfile.LNKTYPE, linkname="../vmfleet-escape.txt")
    ),
    "character device": tar_gz(_member("null", tarfile.CHRTYPE, devmajor=1, devminor=3)),
    "fifo": tar_gz(_member("pipe", tarfile.FIFOTYPE)),
}


def _upload(client: httpx.Client, form: str, archive: bytes, **fields: str) -> httpx.Response:
    if form == "query":
        params = {"name": "evil", "size_gb": "1", **fields}
        return client.post("/volumes/from-archive", params=params, content=archive)
    data = {"name": "evil", "size_gb": "1", **fields}
    return client.post("/volumes", data=data, files={"content": ("a.tar.gz", archive)})


def _volume_dirs(fleet: Fleet) -> list[str]:
    assert fleet.worker is not None
    volumes = fleet.worker.data_dir / "volumes"
    return sorted(p.name for p in volumes.iterdir()) if volumes.exists() else []


def _escaped(fleet: Fleet) -> list[Path]:
    """Where an entry that got out would be: anywhere under the worker's data, or /etc."""
    assert fleet.worker is not None
    found = list(fleet.worker.data_dir.parent.glob("vmfleet-escape.txt"))
    found += fleet.worker.data_dir.rglob("vmfleet-escape.txt")
    return found + [p for p in (Path("/etc/vmfleet-escape.txt"),) if p.exists()]


#: Not an escape, just broken: refused the same way.
MALFORMED_ARCHIVES: Final = {
    "not gzip": b"PK\x03\x04 a zip",
    "truncated gzip": b"\x1f\x8b\x08\x00",
    "entry under a file": tar_gz(_member("a"), _member("a/b")),
    "name too long": tar_gz(_member("x" * 300)),
    "hard link to a missing file": tar_gz(_member("hl", tarfile.LNKTYPE, linkname="missing")),
}


@pytest.mark.parametrize("form", ["query", "multipart"])
@pytest.mark.parametrize("kind", sorted(UNSAFE_ARCHIVES))
def test_unsafe_archives_are_refused_and_leave_nothing(
    with_worker: Fleet, kind: str, form: str
) -> None:
    with with_worker.api.client() as client:
        response = _upload(client, form, UNSAFE_ARCHIVES[kind])
    assert_nothing_stored(with_worker)
    assert _volume_dirs(with_worker) == []
    assert _escaped(with_worker) == []
    assert_error(response, 400, "invalid_archive")


@pytest.mark.parametrize("archive", list(MALFORMED_ARCHIVES.values()), ids=list(MALFORMED_ARCHIVES))
def test_malformed_archives_are_refused_and_leave_nothing(
    with_worker: Fleet, archive: bytes
) -> None:
    with with_worker.api.client() as client:
        response = _upload(client, "query", archive)
    assert_nothing_stored(with_worker)
    assert _volume_dirs(with_worker) == []
    assert_error(response, 400, "invalid_archive")


def test_archive_content_past_size_gb_is_refused_unread(with_worker: Fleet) -> None:
    """A header that claims more than ``size_gb`` GiB: refused before a byte is extracted
    (the archive does not even hold the data)."""
    archive = tar_gz(_member("big.bin", size=(1 << 30) + 1))
    with with_worker.api.client() as client:
        response = _upload(client, "query", archive)
    assert_error(response, 400, "archive_too_large")
    assert_nothing_stored(with_worker)
    assert _volume_dirs(with_worker) == []


# -- paths: mounts, images, ids -------------------------------------------------------------------

BAD_MOUNT_PATHS: Final = [
    "/data/../etc",
    "/data/../../root",
    "/data/./../usr/lib",
    "//etc",
    "/",
    "/proc/self",
    "/var/../var/lib",
    "data",
    "../data",
    "/da ta",
    "/data\n",
]


def test_mount_paths_out_of_bounds_are_refused_and_make_nothing(with_worker: Fleet) -> None:
    """The worker resolves ``..`` before it checks hypeman's forbidden roots, and answers
    before the instance exists (no record, the volume stays unattached)."""
    with with_worker.api.client() as client:
        volume = client.post("/volumes", json={"name": "m", "size_gb": 1, "id": "sec-mount"})
        assert volume.status_code == 201, volume.text
        try:
            for mount_path in BAD_MOUNT_PATHS:
                body = {
                    "name": "mnt",
                    "image": "docker.io/library/busybox:latest",
                    "size": "128MB",
                    "overlay_size": "64MB",
                    "volumes": [{"volume_id": "sec-mount", "mount_path": mount_path}],
                }
                response = client.post("/instances", json=body)
                assert_error(response, 400, "invalid_mount_path")
                assert_nothing_stored(with_worker, volumes=("sec-mount",))
                assert "attachments" not in client.get("/volumes/sec-mount").json()
        finally:
            assert client.delete("/volumes/sec-mount").status_code == 204


BAD_IMAGE_NAMES: Final = [
    "..",
    "../../etc/passwd",
    "docker.io/../etc",
    "library/..",
    "a/../b",
    "alpine/..",
    "/etc/passwd",
    "alpine:../../x",
    "alpine@sha256:../../../x",
    "alpine..x",
    "./alpine",
    "alpine/",
    "ALPINE",
    "alpine\n",
    "alpine:latest\x00",
    " alpine",
    "-alpine",
    "localhost:99999999999/../x",
    "a" * 300,
]


@pytest.mark.parametrize("name", BAD_IMAGE_NAMES, ids=repr)
def test_bad_image_references_are_refused_everywhere(hostless: Fleet, name: str) -> None:
    encoded = "/images/" + quote(name, safe="").replace(".", "%2E")  # no dot-segment folding
    # Starlette's router matches a path parameter up to a final newline (``$``), so
    # ``/images/alpine%0A`` looks up ``alpine``: a 404 here, never a path.
    lookup = 404 if name.endswith("\n") else 400
    with hostless.api.client() as client:
        assert_error(client.post("/images", json={"name": name}), 400, "invalid_name")
        created = client.post("/instances", json={"name": "web", "image": name})
        assert_error(created, 400, "invalid_name")
        assert_error(client.get(encoded), lookup)
        assert_error(client.delete(encoded), lookup)
    assert_nothing_stored(hostless)


@pytest.mark.parametrize(
    "target",
    [
        "/images/../instances",
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2E%2E/%2E%2E/etc/passwd",
    ],
)
def test_dot_segments_in_an_image_path_are_a_bad_reference(hostless: Fleet, target: str) -> None:
    status, _, body = raw_request(
        hostless.api, f"GET {target} HTTP/1.1\r\n".encode(), authorized=True
    )
    assert (status, json.loads(body)["code"]) == (400, "invalid_name")


@pytest.mark.parametrize(
    "target",
    [
        "/volumes/..%2F..%2Fetc",
        "/volumes/../instances",
        "/volumes/%2E%2E",
        "/instances/..%2Fx",
        "/instances/%2E%2E",
    ],
)
def test_ids_are_looked_up_never_used_as_paths(hostless: Fleet, target: str) -> None:
    for method in ("GET", "DELETE"):
        status, _, body = raw_request(
            hostless.api, f"{method} {target} HTTP/1.1\r\n".encode(), authorized=True
        )
        assert (status, json.loads(body)["code"]) == (404, "not_found"), (method, target)


@pytest.mark.parametrize("volume_id", ["../etc", "a/b", "..", ".hidden", "vol\n", "v" * 64])
def test_volume_ids_that_could_be_paths_are_refused(hostless: Fleet, volume_id: str) -> None:
    """In every form that takes one; ``vol\\n`` got through the JSON form (msgspec's
    ``pattern`` is a search, so ``$`` matched before the newline) and wedged the host."""
    with hostless.api.client() as client:
        as_json = client.post("/volumes", json={"name": "d", "size_gb": 1, "id": volume_id})
        assert_error(as_json, 400, "Bad Request")
        assert_error(_upload(client, "query", b"\x1f\x8b", id=volume_id), 400, "invalid_field")
        assert_error(_upload(client, "multipart", b"\x1f\x8b", id=volume_id), 400, "invalid_field")
    assert_nothing_stored(hostless)


@pytest.mark.parametrize("name", ["web\n", "web\r", "web\n\n", "\nweb", "we/b", "../web"])
def test_instance_names_are_whole_names(hostless: Fleet, name: str) -> None:
    with hostless.api.client() as client:
        response = client.post("/instances", json={"name": name, "image": "busybox"})
    assert_error(response, 400, "Bad Request")
    assert "at `$.name`" in response.json()["message"]
    assert_nothing_stored(hostless)


# -- sizes --------------------------------------------------------------------------------------

OVER: Final = b'{"name": "web", "image": "' + b"x" * MIB + b'"}'
#: Every route that reads a JSON body, with what it must find to get that far (a route that
#: first resolves an instance or a volume answers 404 without reading otherwise).
JSON_BODY_ROUTES: Final = [
    ("POST", "/instances"),
    ("POST", "/instances/sec-i1/start"),
    ("POST", "/instances/sec-i1/volumes/sec-v1"),
    ("POST", "/volumes"),
    ("POST", "/images"),
    ("POST", "/hosts/gone/drain"),
]


@pytest.fixture(scope="module")
def with_records(nats_url: str) -> Iterator[Fleet]:
    """A fleet of its own with an instance and a volume on a host that is gone, and that
    host drained: enough for every JSON route to read its body (and then send nothing)."""
    prefix = "s" + secrets.token_hex(4)
    s = Subjects(prefix)
    now = datetime.now(UTC)
    records: list[tuple[str, str, object]] = [
        (s.instances_bucket, "sec-i1", instance_record("sec-i1", "web", "gone")),
        (
            s.volumes_bucket,
            "sec-v1",
            VolumeRecord(id="sec-v1", name="v", size_gb=1, host="gone", created_at=now),
        ),
        (s.drains_bucket, "gone", DrainRecord(host="gone", drained_at=now)),
    ]

    async def put() -> None:
        nc = await nats.connect(nats_url)
        try:
            for bucket, key, value in records:
                await Bus(nc, prefix).put(bucket, key, value)
        finally:
            await nc.close()

    with running_gateway(nats_url, prefix) as api, api.client() as client:
        anyio.run(put)
        deadline = time.monotonic() + 10
        while client.get("/volumes/sec-v1").status_code != 200:
            assert time.monotonic() < deadline, "the gateway's view never showed the records"
            time.sleep(0.02)
        yield Fleet(nats_url, prefix, api)


@pytest.mark.parametrize(("method", "path"), JSON_BODY_ROUTES)
def test_json_body_over_1_mib_is_413_declared_or_chunked(
    with_records: Fleet, method: str, path: str
) -> None:
    headers = {"Content-Type": "application/json"}

    def chunks() -> Iterator[bytes]:
        yield OVER[: MIB // 2]
        yield OVER[MIB // 2 :]

    with with_records.api.client() as client:
        declared = client.request(method, path, content=OVER, headers=headers)
        chunked = client.request(method, path, content=chunks(), headers=headers)
    assert_error(declared, 413, "payload_too_large")
    assert_error(chunked, 413, "payload_too_large")  # no Content-Length: counted while reading


def test_a_chunked_body_is_counted_by_its_bytes_not_its_chunk_sizes(hostless: Fleet) -> None:
    """One chunk that says 2 MiB and carries it: refused once 1 MiB came in."""
    body = b"x" * (2 * MIB)
    head = b"POST /instances HTTP/1.1\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n"
    status, _, answer = raw_request(
        hostless.api, head, body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), authorized=True
    )
    assert (status, json.loads(answer)["code"]) == (413, "payload_too_large")


def test_a_lying_content_length_cannot_smuggle_a_bigger_body(hostless: Fleet) -> None:
    """Declared small, sent big: the body is what was declared (here a valid create, so a
    503 from placement), the rest is never read as this body."""
    small = b'{"name": "web", "image": "docker.io/library/busybox:latest"}'
    head = b"POST /instances HTTP/1.1\r\nContent-Type: application/json\r\n"
    lying = head + b"Content-Length: %d\r\n" % len(small)
    status, _, answer = raw_request(
        hostless.api, lying, body=small + b"x" * (2 * MIB), authorized=True
    )
    assert (status, json.loads(answer)["code"]) == (503, "no_capacity")
    assert_nothing_stored(hostless)


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 10\r\nContent-Length: 20\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 1e9\r\n",
        b"Content-Length: +20\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        # Both framings (RFC 9112 §6.3 lets a server refuse it): the classic smuggling shape.
        b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_ambiguous_framing_is_refused_before_the_app(hostless: Fleet, framing: bytes) -> None:
    """The HTTP server itself refuses these (a plain-text 400 from uvicorn: the request
    never reaches the app, so it cannot be answered in the API's error shape)."""
    head = b"POST /instances HTTP/1.1\r\nContent-Type: application/json\r\n" + framing
    status, _, _ = raw_request(hostless.api, head, body=b"x" * 20, authorized=True)
    assert status == 400
    assert_nothing_stored(hostless)


@pytest.fixture
def small_gib(monkeypatch: pytest.MonkeyPatch) -> int:
    """The gateway (in this process) counts ``size_gb`` in units of 64 KiB for the test,
    so "over its size_gb" takes 64 KiB to show instead of a GiB."""
    monkeypatch.setattr(gateway.archives, "GIB", 64 << 10)
    return 64 << 10


@pytest.mark.parametrize("form", ["query", "multipart"])
def test_an_archive_over_size_gb_is_413_while_reading(
    hostless: Fleet, small_gib: int, form: str
) -> None:
    """Chunked (no Content-Length to check first): counted as it arrives."""
    archive = b"\x1f\x8b" + b"\0" * (small_gib + 1)
    with hostless.api.client() as client:
        if form == "query":

            def chunks() -> Iterator[bytes]:
                yield archive[: small_gib // 2]
                yield archive[small_gib // 2 :]

            params = {"name": "big", "size_gb": "1"}
            response = client.post("/volumes/from-archive", params=params, content=chunks())
        else:
            response = _upload(client, form, archive)
        fine = _upload(client, form, archive[:small_gib])
    assert_error(response, 413, "payload_too_large")
    assert_error(fine, 503, "no_capacity")  # at the limit: read whole, then placed
    assert_nothing_stored(hostless)


def test_a_multipart_upload_is_bounded_before_its_fields_are_known(nats_url: str) -> None:
    """``size_gb`` is inside the form: until it is read the bound is ``max_archive_bytes``,
    by the declared length and, chunked, while reading."""
    prefix = "s" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix, max_archive_bytes=256 << 10) as api, api.client() as c:
        archive = b"\x1f\x8b" + b"\0" * (300 << 10)
        declared = _upload(c, "multipart", archive)
        form = c.build_request(
            "POST", "/volumes", data={"name": "big", "size_gb": "1"}, files={"content": archive}
        )
        body = form.read()
        chunked = c.post(
            "/volumes",
            content=iter([body[: 128 << 10], body[128 << 10 :]]),
            headers={"Content-Type": form.headers["Content-Type"]},
        )
        assert_error(declared, 413, "payload_too_large")
        assert_error(chunked, 413, "payload_too_large")
        assert_nothing_stored(Fleet(nats_url, prefix, api))


# -- raw HTTP -----------------------------------------------------------------------------------


def raw_request(
    api: GatewayHandle, head: bytes, *, body: bytes = b"", authorized: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send the request line and headers ``head`` (each line ending in CRLF; ``Host``,
    ``Connection: close`` and, if ``authorized``, the token are added) and ``body``
    exactly as given, and return the first response."""
    host, port = api.base_url.removeprefix("http://").split(":")
    head += b"Host: gw\r\nConnection: close\r\n"
    if authorized:
        head += f"Authorization: Bearer {api.token}\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(body)  # may be answered (and closed) before it is all read
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while not _complete(received) and (chunk := sock.recv(65536)):
                received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    raw_headers, _, content = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in raw_headers.split(b"\r\n"):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(content)))
    return int(status_line.split()[1]), headers, content[:length]


def _complete(received: bytes) -> bool:
    head, sep, content = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return len(content) >= int(value.strip())
    return False
