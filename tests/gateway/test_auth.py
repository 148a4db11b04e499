"""Every route but the public ones needs a valid HS256 token; errors are hypeman's shape."""

from __future__ import annotations

import time

import anyio
import httpx
import jwt
import pytest

from gateway import GatewayConfig, create_app
from natsbus import BusOptions

SECRET = "test-secret-0123456789abcdef-0123456789"

pytestmark = pytest.mark.anyio


def _client() -> httpx.AsyncClient:
    # No lifespan: these requests never reach a route that needs NATS.
    app = create_app(GatewayConfig(bus=BusOptions(urls=("nats://127.0.0.1:1",)), jwt_secret=SECRET))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def _token(secret: str = SECRET, **claims: object) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": "t", "iat": now, "exp": now + 3600, **claims}, secret, algorithm="HS256"
    )


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "authorization header required"),
        ("Basic abc", "invalid authorization header format"),
        ("Bearer", "invalid authorization header format"),
        ("Bearer not-a-jwt", "invalid token"),
        (f"Bearer {_token('another-secret-0123456789-0123456789')}", "invalid token"),
        (f"Bearer {_token(exp=int(time.time()) - 10)}", "token has expired"),
        (f"Bearer {_token(scope='repository:x:push')}", "invalid token type"),
    ],
)
async def test_refused(header: str | None, reason: str) -> None:
    headers = {"Authorization": header} if header else {}
    async with _client() as client:
        response = await client.get("/hosts", headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "code": "Unauthorized",
        "message": f"security requirements failed: {reason}",
    }
    assert response.headers["x-should-retry"] == "false"


async def test_valid_token_passes_to_routing() -> None:
    async with _client() as client:
        response = await client.get(
            "/no-such-route", headers={"Authorization": f"bearer {_token()}"}
        )
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_health_is_public() -> None:
    async with _client() as client:
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_wrong_method_is_json_405() -> None:
    async with _client() as client:
        response = await client.post("/health")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


async def test_a_token_accepted_before_is_refused_once_it_expires() -> None:
    """The gateway remembers tokens it verified, never past their expiry."""
    expires = int(time.time()) + 2
    headers = {"Authorization": f"Bearer {_token(exp=expires)}"}
    async with _client() as client:
        accepted = await client.get("/no-such-route", headers=headers)
        while time.time() <= expires:
            await anyio.sleep(0.2)
        refused = await client.get("/no-such-route", headers=headers)
    assert accepted.status_code == 404
    assert refused.status_code == 401
    assert refused.json()["message"] == "security requirements failed: token has expired"
