"""Responses encoded by msgspec, and the one place errors become HTTP."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from schemas.errors import VmfleetError

__all__ = ["JSONBytesResponse", "MsgspecResponse", "error_response"]

_encoder = msgspec.json.Encoder()


class MsgspecResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class JSONBytesResponse(Response):
    """JSON that is already encoded (the view's cached renderings)."""

    media_type = "application/json"


def error_response(exc: VmfleetError) -> MsgspecResponse:
    """hypeman's error body, plus the SDK's retry hint so a 409 is not sent three times."""
    headers = {"x-should-retry": "true" if exc.retryable else "false"}
    return MsgspecResponse(
        {"code": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
    )
