"""Exception handlers: every error leaves the gateway as hypeman's JSON error shape.

NATS failures are translated here, at the edge, once: a request that could not reach the
bus is a 503 the SDK may retry, never an anonymous 500.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.responses import error_response
from schemas.errors import HostUnavailable, VmfleetError

__all__ = ["EXCEPTION_HANDLERS", "StrayCancellation"]

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


async def _vmfleet_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VmfleetError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = VmfleetError(exc.detail or "error", code=_HTTP_CODES.get(exc.status_code, "error"))
    err.status = exc.status_code
    response = error_response(err)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _bus_error(request: Request, exc: Exception) -> Response:
    log.warning("NATS failed during %s %s: %r", request.method, request.url.path, exc)
    return error_response(
        HostUnavailable(f"the fleet's message bus did not answer: {exc!r}", code="nats_unavailable")
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(VmfleetError("internal error"))


EXCEPTION_HANDLERS = {
    VmfleetError: _vmfleet_error,
    HTTPException: _http_error,
    nats.errors.Error: _bus_error,
    Exception: _unexpected,
}


class StrayCancellation:
    """A ``CancelledError`` that nobody aimed at the request becomes a 503 in the API's shape.

    nats-py cancels its own futures (a pending ``next_msg``, a request's reply) when its
    connection closes under a request; the handler then sees ``CancelledError`` although its
    task was never cancelled. It is not an ``Exception``, so the handlers above miss it and
    the server would answer a plain-text 500. A real cancellation (the task's own
    ``cancelling()`` count is set) or one after the response started still propagates.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if started or task is None or task.cancelling():
                raise
            log.warning(
                "a stray cancellation ended %s %s", scope["method"], scope["path"], exc_info=True
            )
            response = error_response(
                HostUnavailable(
                    "the fleet's message bus dropped the request; retry",
                    code="nats_unavailable",
                )
            )
            await response(scope, receive, send)
