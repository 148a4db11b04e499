"""Bad requests get hypeman's 4xx codes as JSON, never a 5xx, and nothing is created.

These run against a real gateway on real NATS with no host at all: any request that got
past validation would answer 503 ``no_capacity``, so a 400 here proves the check ran
before placement. Body size limits, tokens and path traversal: tests/security/test_http.py.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.support.gateway import GatewayHandle


@pytest.fixture
def gw(shared_gw: GatewayHandle) -> GatewayHandle:
    return shared_gw


VALID = {"name": "web", "image": "docker.io/library/busybox:latest"}


def _post(gw: GatewayHandle, body: object = None, **kwargs: object) -> httpx.Response:
    with gw.client() as client:
        if body is not None:
            return client.post("/instances", json=body, **kwargs)  # type: ignore[arg-type]
        return client.post("/instances", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"image": "busybox"}, "Bad Request", "Object missing required field `name`"),
        ({**VALID, "name": "Web"}, "Bad Request", "at `$.name`"),
        ({**VALID, "name": "-web"}, "Bad Request", "at `$.name`"),
        ({**VALID, "name": "a" * 64}, "Bad Request", "at `$.name`"),
        ({**VALID, "vcpus": "2"}, "Bad Request", "Expected `int`, got `str`"),
        ({**VALID, "vcpus": -1}, "Bad Request", "at `$.vcpus`"),
        ({**VALID, "hypervisor": "vmware"}, "Bad Request", "at `$.hypervisor`"),
        ({**VALID, "size": "1.5GB"}, "invalid_size", "invalid size format: "),
        ({**VALID, "size": "1Gb"}, "invalid_size", "bits, not bytes"),
        ({**VALID, "hotplug_size": "lots"}, "invalid_hotplug_size", "invalid hotplug_size"),
        ({**VALID, "overlay_size": "-1GB"}, "invalid_overlay_size", "invalid overlay_size"),
        ({**VALID, "overlay_size": "101GB"}, "invalid_overlay_size", "maximum of 100GB"),
        ({**VALID, "size": "33GB"}, "invalid_size", "maximum of 32GB"),
        ({**VALID, "disk_io_bps": "fast"}, "invalid_disk_io_bps", "invalid disk_io_bps"),
        (
            {**VALID, "network": {"bandwidth_download": "1.5Gbps"}},
            "invalid_bandwidth_download",
            "invalid bandwidth_download",
        ),
        ({**VALID, "vcpus": 17}, "invalid_vcpus", "maximum of 16"),
        ({**VALID, "devices": ["gpu0"]}, "not_supported", "passthrough"),
        ({**VALID, "image": "UPPER/Case"}, "invalid_name", "invalid image name"),
        (
            {
                **VALID,
                "volumes": [
                    {"volume_id": "v1", "mount_path": "/data", "overlay": True, "overlay_size": "x"}
                ],
            },
            "invalid_overlay_size",
            "invalid overlay_size for volume v1",
        ),
    ],
)
def test_create_refuses_with_hypemans_code(
    gw: GatewayHandle, body: dict[str, object], code: str, message: str
) -> None:
    response = _post(gw, body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert message in response.json()["message"]
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[]", b'"web"', b"null", b'{"name": "web", "image": 5}', b"\xff\xfe"]
)
def test_malformed_json_is_400(gw: GatewayHandle, raw: bytes) -> None:
    response = _post(gw, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == "Bad Request"
    assert response.json()["message"].startswith("request body has an error: ")


def test_valid_request_without_hosts_is_no_capacity(gw: GatewayHandle) -> None:
    response = _post(gw, VALID)
    assert response.status_code == 503
    assert response.json()["code"] == "no_capacity"
    assert response.headers["x-should-retry"] == "true"


def test_mount_of_unknown_volume_is_404(gw: GatewayHandle) -> None:
    body = {**VALID, "volumes": [{"volume_id": "nope", "mount_path": "/data"}]}
    response = _post(gw, body)
    assert response.status_code == 404
    assert response.json() == {"code": "not_found", "message": "volume nope not found"}


@pytest.mark.parametrize("key", ["has space", "a.b", "a*", "x" * 129, "é"])
def test_idempotency_key_must_be_a_token(gw: GatewayHandle, key: str) -> None:
    response = _post(gw, VALID, headers={"Idempotency-Key": key.encode()})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_idempotency_key"


def test_unknown_route_and_wrong_method_are_json(gw: GatewayHandle) -> None:
    with gw.client() as client:
        missing = client.get("/nope")
        wrong = client.put("/instances")
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/instances/nothing"),
        ("DELETE", "/instances/nothing"),
        ("POST", "/instances/nothing/stop"),
        ("POST", "/instances/nothing/start"),
        ("POST", "/instances/nothing/standby"),
        ("POST", "/instances/nothing/restore"),
        ("GET", "/instances/nothing/logs"),
        ("GET", "/instances/nothing/wait?state=Running"),
        ("POST", "/instances/nothing/volumes/v"),
        ("DELETE", "/instances/nothing/volumes/v"),
        ("GET", "/volumes/nothing"),
        ("DELETE", "/volumes/nothing"),
        ("GET", "/images/nothing"),
        ("DELETE", "/images/docker.io%2Flibrary%2Fnothing:latest"),
    ],
)
def test_unknown_resources_are_404(gw: GatewayHandle, method: str, path: str) -> None:
    with gw.client() as client:
        response = client.request(method, path, json={"mount_path": "/data"})
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"name": "d"}, "Bad Request"),
        ({"name": "d", "size_gb": 0}, "Bad Request"),
        ({"name": "d", "size_gb": 1, "id": "../etc"}, "Bad Request"),
        ({"name": "d", "size_gb": 1}, "no_capacity"),
    ],
)
def test_volume_create_checks_before_placing(
    gw: GatewayHandle, body: dict[str, object], code: str
) -> None:
    with gw.client() as client:
        response = client.post("/volumes", json=body)
    assert response.json()["code"] == code
    assert response.status_code == (503 if code == "no_capacity" else 400)


@pytest.mark.parametrize(
    ("form", "files", "code"),
    [
        ({"size_gb": "1"}, {"content": b"x"}, "missing_field"),
        ({"name": "d"}, {"content": b"x"}, "missing_field"),
        ({"name": "d", "size_gb": "0"}, {"content": b"x"}, "invalid_field"),
        ({"name": "d", "size_gb": "one"}, {"content": b"x"}, "invalid_field"),
        ({"name": "d", "size_gb": "1", "id": "a/b"}, {"content": b"x"}, "invalid_field"),
        ({"name": "d", "size_gb": "1"}, {"other": b"x"}, "missing_file"),
    ],
)
def test_multipart_volume_fields_are_checked(
    gw: GatewayHandle, form: dict[str, str], files: dict[str, bytes], code: str
) -> None:
    with gw.client() as client:
        response = client.post("/volumes", data=form, files=files)
    assert (response.status_code, response.json()["code"]) == (400, code)


def test_raw_archive_upload_is_checked_and_bounded(gw: GatewayHandle) -> None:
    with gw.client() as client:
        missing = client.post("/volumes/from-archive?size_gb=1", content=b"\x1f\x8b")
        bad_size = client.post("/volumes/from-archive?name=d&size_gb=-1", content=b"\x1f\x8b")
        empty = client.post("/volumes/from-archive?name=d&size_gb=1", content=b"")
        fine = client.post("/volumes/from-archive?name=d&size_gb=1", content=b"\x1f\x8b")
    assert missing.json()["code"] == "missing_field"
    assert bad_size.json()["code"] == "invalid_field"
    assert empty.json()["code"] == "invalid_request"
    assert (fine.status_code, fine.json()["code"]) == (503, "no_capacity")  # checked, placed last
    big = _declared_only(gw, "/volumes/from-archive?name=d&size_gb=1", (1 << 30) + 1)
    assert big.startswith(b"HTTP/1.1 413 ") and b"application/json" in big


def _declared_only(gw: GatewayHandle, path: str, length: int) -> bytes:
    """Send only the headers of a request announcing ``length`` bytes; return the answer."""
    host, port = gw.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gw.token}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        return sock.recv(65536)
