"""Exception handlers: every error leaves the gateway as hypeman's JSON error shape.

NATS failures are translated here, at the edge, once: a request that could not reach the
bus is a 503 the SDK may retry, never an anonymous 500.
"""

from __future__ import annotations

import logging

import nats.errors
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.responses import error_response
from schemas.errors import HostUnavailable, VmfleetError

__all__ = ["EXCEPTION_HANDLERS"]

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
