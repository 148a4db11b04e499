"""A small client of the gateway's HTTP API, configured like hypeman's tools:
``HYPEMAN_BASE_URL`` and ``HYPEMAN_API_KEY``.

Every failure of a call is one exception, ``GatewayError``, carrying the ``code`` and
``message`` to print and the exit code a shell script sees::

    GatewayError
      exit 1  the gateway answered with an error: its {code, message}, unchanged
      exit 3  the gateway cannot be reached (code "unreachable"), or it refused the
              credentials (401/403, the gateway's code "Unauthorized")

Settings that cannot work (no API key, a base URL that is not http(s)) are a
``ConfigError`` before any call is made (exit 2, like every configuration error).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote, urlsplit

import httpx

from cli.settings import ConfigError

__all__ = [
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "ClientConfig",
    "GatewayClient",
    "GatewayError",
    "SseEvent",
    "iter_sse",
    "segment",
]

EXIT_OK: Final = 0
#: The gateway refused the call, or the operation it ran failed (an image pull, say).
EXIT_REFUSED: Final = 1
#: Usage and configuration errors (argparse exits with 2 too).
EXIT_CONFIG: Final = 2
#: The gateway cannot be reached, or it does not accept the credentials.
EXIT_UNREACHABLE: Final = 3

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8080"
#: The gateway answers a command within 55 s (then 504); leave it room.
CALL_TIMEOUT_S: Final = 120.0
CONNECT_TIMEOUT_S: Final = 10.0
#: A followed stream gets a keep-alive every 15 s; this much silence means it is dead.
STREAM_IDLE_S: Final = 60.0
#: The resolver's message for an unknown id, name or prefix (hypeman's wording).
_GENERIC_NOT_FOUND: Final = frozenset({"resource not found", "image not found"})


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientConfig:
        env = os.environ if env is None else env
        base_url = (env.get("HYPEMAN_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"HYPEMAN_BASE_URL: {base_url!r} is not an http:// or https:// URL")
        api_key = env.get("HYPEMAN_API_KEY", "").strip()
        if not api_key:
            raise ConfigError(
                "HYPEMAN_API_KEY: not set (`vmfleet dev` prints an export line for it, "
                "`vmfleet token` prints a token)"
            )
        return cls(base_url=base_url, api_key=api_key)


class GatewayError(Exception):
    """A call failed; ``str()`` is ``"<code>: <message>"``, the line the CLI prints."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        exit_code: int = EXIT_REFUSED,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.exit_code = exit_code

    @classmethod
    def unreachable(cls, base_url: str, exc: Exception) -> GatewayError:
        reason = str(exc) or type(exc).__name__
        return cls(
            "unreachable",
            f"cannot reach the gateway at {base_url}: {reason}",
            exit_code=EXIT_UNREACHABLE,
        )

    @classmethod
    def from_response(cls, response: httpx.Response, *, what: str | None = None) -> GatewayError:
        """The gateway's ``{code, message}`` (or the status line of a body that is not one).
        ``what`` ("instance web") replaces the resolver's generic not-found message."""
        code, message = str(response.status_code), response.reason_phrase or "error"
        with contextlib.suppress(ValueError):
            body = response.json()
            if isinstance(body, dict) and isinstance(body.get("code"), str):
                code, message = body["code"], str(body.get("message", ""))
        if what is not None and response.status_code == 404 and message in _GENERIC_NOT_FOUND:
            message = f"{what} not found"
        auth = response.status_code in (401, 403)
        return cls(
            code,
            message,
            status=response.status_code,
            exit_code=EXIT_UNREACHABLE if auth else EXIT_REFUSED,
        )


@dataclass(frozen=True)
class SseEvent:
    data: str
    id: str | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Server-Sent Events from a stream's lines: ``id:`` and ``data:`` fields, one event
    per blank line; comments (``: keep-alive``) and other fields are skipped."""
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if not line:
            if data:
                yield SseEvent("\n".join(data), event_id)
            data, event_id = [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
    if data:
        yield SseEvent("\n".join(data), event_id)


def segment(text: str) -> str:
    """``text`` as one path segment (image names hold ``/`` and ``:``)."""
    return quote(text, safe="")


class GatewayClient:
    """Blocking calls to one gateway; use it as a context manager."""

    def __init__(
        self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.config = config
        self._http = httpx.Client(
            base_url=config.base_url,
            headers={"Authorization": f"Bearer {config.api_key}"},
            timeout=httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            transport=transport,
        )

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        what: str | None = None,
    ) -> httpx.Response:
        """The response of a call that succeeded; any other outcome is a GatewayError."""
        with self._translated():
            response = self._http.request(method, path, json=json, params=params)
        if response.is_error:
            raise GatewayError.from_response(response, what=what)
        return response

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        what: str | None = None,
    ) -> Any:
        """The decoded JSON body of a call (None for an empty one, as a 204)."""
        response = self.request(method, path, json=json, params=params, what=what)
        return response.json() if response.content else None

    @contextlib.contextmanager
    def events(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idle_s: float | None = None,
        what: str | None = None,
    ) -> Iterator[Iterator[SseEvent]]:
        """An SSE stream's events, until the gateway ends it. With ``idle_s``, that much
        silence ends it too (to read a backlog of a stream that never ends); without,
        silence longer than ``STREAM_IDLE_S`` (four missed keep-alives) is an error."""
        read_s = STREAM_IDLE_S if idle_s is None else idle_s
        timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=read_s)
        with self._translated():
            request = self._http.build_request(
                "GET", path, params=params, headers=headers, timeout=timeout
            )
            response = self._http.send(request, stream=True)
        try:
            if response.is_error:
                with self._translated():
                    response.read()
                raise GatewayError.from_response(response, what=what)
            yield self._stream_events(response, idle_ends=idle_s is not None)
        finally:
            response.close()

    def _stream_events(self, response: httpx.Response, *, idle_ends: bool) -> Iterator[SseEvent]:
        try:
            yield from iter_sse(response.iter_lines())
        except httpx.ReadTimeout as exc:
            if idle_ends:
                return
            raise GatewayError(
                "unreachable",
                f"the gateway at {self.config.base_url} sent nothing for {STREAM_IDLE_S:g} s",
                exit_code=EXIT_UNREACHABLE,
            ) from exc
        except httpx.HTTPError as exc:
            raise GatewayError.unreachable(self.config.base_url, exc) from exc

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except httpx.HTTPError as exc:
            raise GatewayError.unreachable(self.config.base_url, exc) from exc
