"""A client of one Cloud Hypervisor's REST API, over its unix socket.

One HTTP connection per request, closed after it (``Connection: close``, no keep-alive
pool): hypeman found pooled connections piling up until CH refused new ones. Any 2xx is
success, because CH and its spec disagree in places (``vmm.shutdown`` answers 200 where the
spec says 204). Transport failures and non-2xx answers become :class:`ChApiError`, with
CH's own error text, so callers never see httpx.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import msgspec

from schemas.errors import HypervisorError
from worker.drivers.ch_wire import VmInfo, VmmPingResponse

__all__ = ["ChApi", "ChApiError", "open_ch_api"]

T = TypeVar("T")

_BASE = "http://localhost/api/v1/"
_encoder = msgspec.json.Encoder()


class ChApiError(HypervisorError):
    """CH refused a request (``http_status`` set) or could not be reached (None)."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class ChApi:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def put(self, endpoint: str, body: msgspec.Struct | None = None) -> bytes:
        """PUT ``/api/v1/<endpoint>``; return the response body (empty for 204)."""
        content = _encoder.encode(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with _translated(endpoint):
            response = await self._client.put(endpoint, content=content, headers=headers)
        return _checked(endpoint, response)

    async def get(self, endpoint: str, type_: type[T]) -> T:
        with _translated(endpoint):
            response = await self._client.get(endpoint)
        body = _checked(endpoint, response)
        try:
            return msgspec.json.decode(body, type=type_)
        except msgspec.DecodeError as exc:
            raise ChApiError(f"{endpoint}: unexpected answer: {exc}") from exc

    async def ping(self) -> VmmPingResponse:
        return await self.get("vmm.ping", VmmPingResponse)

    async def info(self) -> VmInfo:
        return await self.get("vm.info", VmInfo)


@contextlib.asynccontextmanager
async def open_ch_api(socket: Path, *, timeout_s: float = 30.0) -> AsyncIterator[ChApi]:
    """A client for the CH whose API socket is ``socket``, for one operation."""
    transport = httpx.AsyncHTTPTransport(
        uds=str(socket), limits=httpx.Limits(max_keepalive_connections=0)
    )
    async with httpx.AsyncClient(
        transport=transport,
        base_url=_BASE,
        timeout=timeout_s,
        headers={"Connection": "close"},
    ) as client:
        yield ChApi(client)


@contextlib.contextmanager
def _translated(endpoint: str) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        raise ChApiError(f"{endpoint}: {type(exc).__name__}: {exc}") from exc


def _checked(endpoint: str, response: httpx.Response) -> bytes:
    if 200 <= response.status_code < 300:
        return response.content
    detail = response.text.strip() or response.reason_phrase
    raise ChApiError(
        f"{endpoint} failed with status {response.status_code}: {detail}",
        http_status=response.status_code,
    )
