"""Parsing HTTP requests: bodies, query parameters, headers, Go durations, image names.

What hypeman's OpenAPI validator rejects (malformed JSON, wrong types, the name pattern,
enums, bad query parameters) is a 400 with code ``"Bad Request"`` and a message that names
the field (reference §1.3). msgspec's decoders in ``schemas.codec`` enforce the schema; this
module reads the bytes and words the errors. It knows nothing of the fleet: checks that read
the fleet view live in ``gateway.plan``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Final, TypeVar

import msgspec
from starlette.requests import Request

from schemas.errors import BadRequest, PayloadTooLarge
from schemas.references import normalize_reference
from schemas.snapshots import SnapshotCompressionConfig
from schemas.subjects import is_valid_token

__all__ = [
    "bad_request",
    "decode_body",
    "idempotency_key",
    "normalize_image",
    "parse_duration",
    "query_bool",
    "query_int",
    "query_tags",
    "read_body",
    "refuse_compression",
]

T = TypeVar("T")

_MAX_IDEMPOTENCY_KEY: Final = 128


def bad_request(message: str) -> BadRequest:
    """hypeman's validator error: code ``"Bad Request"``."""
    return BadRequest(message, code="Bad Request")


def refuse_compression(compression: SnapshotCompressionConfig | msgspec.UnsetType) -> None:
    """vmfleet keeps saved memory uncompressed (a wake and a fork read it as it is): asking
    for compression is refused rather than ignored; ``{"enabled": false}`` is what it does."""
    if isinstance(compression, SnapshotCompressionConfig) and compression.enabled:
        raise BadRequest(
            "snapshot compression is not supported by vmfleet: saved memory stays "
            'uncompressed; send {"enabled": false} or leave compression out',
            code="not_supported",
        )


# -- bodies ------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) one larger than ``limit`` before and while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


def decode_body(decode: Callable[[bytes], T], body: bytes) -> T:
    """Decode a JSON body; a missing, malformed or mistyped one is a 400 naming the field."""
    if not body.strip():
        raise bad_request("request body has an error: value is required but missing")
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        raise bad_request(f"request body has an error: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(
            f"request body has an error: failed to decode request body: {exc}"
        ) from None


def idempotency_key(request: Request) -> str | None:
    """The client's ``Idempotency-Key``; it becomes a command id, so one NATS token."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not is_valid_token(key) or len(key) > _MAX_IDEMPOTENCY_KEY or not key.isascii():
        raise BadRequest(
            "Idempotency-Key must be 1-128 printable ASCII characters without spaces, "
            "'.', '*' or '>'",
            code="invalid_idempotency_key",
        )
    return key


# -- query parameters ----------------------------------------------------------------------

_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _query_error(name: str, value: str, why: str) -> BadRequest:
    return bad_request(f'parameter "{name}" in query has an error: value {value}: {why}')


def query_bool(request: Request, name: str, default: bool) -> bool:
    """A boolean query parameter, with Go's ``strconv.ParseBool`` spellings."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _query_error(name, raw, "an invalid boolean: invalid syntax")


def query_int(request: Request, name: str, default: int, *, minimum: int = 0) -> int:
    """A whole-number query parameter of at least ``minimum``."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", raw):
        raise _query_error(name, raw, "an invalid integer: invalid syntax")
    value = int(raw)
    if value < minimum:
        raise _query_error(name, raw, f"number must be at least {minimum}")
    return value


_TAG_PARAMETER: Final = re.compile(r"tags\[(.*)\]")


def query_tags(request: Request) -> dict[str, str]:
    """``?tags[team]=a&tags[env]=ci`` (OpenAPI deepObject; the SDK percent-encodes the
    brackets, which arrive decoded here) as ``{"team": "a", "env": "ci"}``. A key given
    twice with different values matches nothing, so it is refused."""
    wanted: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        match = _TAG_PARAMETER.fullmatch(name)
        if match is None:
            continue
        key = match.group(1)
        if not key or wanted.setdefault(key, value) != value:
            raise _query_error(name, value, "each tag key must be named once, and not be empty")
    return wanted


_DURATION_PART: Final = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``"30s"``, ``"1m30s"``, ``"500ms"``) or a bare number of
    seconds; ValueError otherwise."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return float(text)
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0 or not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r}")
    return total


# -- images --------------------------------------------------------------------------------


def normalize_image(reference: str) -> str:
    """``alpine`` → ``docker.io/library/alpine:latest``; 400 ``invalid_name`` if malformed."""
    return normalize_reference(reference).name
