"""Client commands talking to a gateway, configured like hypeman's tools:
HYPEMAN_BASE_URL and HYPEMAN_API_KEY."""

from __future__ import annotations

import os
import sys
from typing import Any

import httpx

__all__ = ["ClientError", "call"]


class ClientError(Exception):
    """The gateway refused the call, or could not be reached; the message says why."""


def call(method: str, path: str, *, json: Any = None) -> Any:
    base_url = os.environ.get("HYPEMAN_BASE_URL", "http://127.0.0.1:8080")
    token = os.environ.get("HYPEMAN_API_KEY")
    if not token:
        raise ClientError("HYPEMAN_API_KEY is not set (`vmfleet token` prints one)")
    try:
        response = httpx.request(
            method,
            f"{base_url.rstrip('/')}{path}",
            json=json,
            timeout=300,
            headers={"Authorization": f"Bearer {token}"},
        )
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach the gateway at {base_url}: {exc}") from None
    body = response.json() if response.content else None
    if response.is_error:
        detail = body.get("message") if isinstance(body, dict) else response.text
        code = body.get("code") if isinstance(body, dict) else response.status_code
        raise ClientError(f"{code}: {detail}")
    return body


def fail(message: str) -> int:
    print(f"vmfleet: {message}", file=sys.stderr)
    return 1
