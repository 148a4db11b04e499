"""Guest sessions over NATS: exec and cp byte streams between a gateway and the worker that
owns the instance, and the one-shot ``stat``.

A session's frames are those of hypeman's exec/cp WebSocket protocols (TEXT: one JSON
document; BINARY: raw bytes), relayed unchanged between the client's WebSocket, the
gateway, the owning worker and the guest agent; only the agent interprets them. What this
module adds is the transport between gateway and worker:

1. **Open**: the gateway subscribes to ``<p>.sess.<host>.<sid>.out`` (it picks the random
   session id), then sends :class:`SessionOpen` as a core request to
   ``<p>.host.<host>.session``. The open carries the client's first frame (the exec or cp
   request), so the worker can audit the argv, honour ``wait_for_agent`` and hand the
   request to the agent without another round trip. The worker subscribes to
   ``<p>.sess.<host>.<sid>.in`` *before* it answers :class:`SessionOpened`.
2. **Frames** (:class:`SessionFrame`, msgpack) flow ``in`` (gateway→worker) and ``out``
   (worker→gateway). Session subjects carry the host id, so per-host NATS permissions
   keep a host from reading any other host's sessions.
3. **Flow control** is by credit, in bytes, each way: the sender of TEXT/BINARY frames may
   send while its credit is positive, and subtracts each frame's size; the receiver grants
   credit (``credit`` frames) as it hands frames on, so in flight per direction there are at
   most ``window`` bytes plus one frame. The gateway grants its window in the open, the
   worker in its answer.
4. **Size**: a BINARY frame on NATS holds at most :data:`MAX_CHUNK_BYTES` (senders split
   bigger ones: for exec stdin and cp data the bytes are one stream, so splitting is
   invisible); output towards the client is cut to :data:`CLIENT_CHUNK_BYTES` (hypeman's
   frame size, well under the SDK's 1 MiB inbound limit). TEXT frames are never split; one
   larger than :data:`MAX_TEXT_BYTES` ends the session with an error.
5. **Liveness**: each side sends ``ping`` every :data:`PING_INTERVAL_S` and gives up on a
   session whose peer sent nothing for :data:`IDLE_TIMEOUT_S` (a gateway or worker that
   died), ending it as if closed.
6. **End**: ``close`` (clean end: the agent's session ended, or the client disconnected)
   or ``error`` (with a message) from either side; the worker then aborts the agent
   session (the agent kills the process group) and both unsubscribe.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from schemas.errors import ErrorInfo

__all__ = [
    "CLIENT_CHUNK_BYTES",
    "IDLE_TIMEOUT_S",
    "MAX_CHUNK_BYTES",
    "MAX_TEXT_BYTES",
    "PING_INTERVAL_S",
    "WINDOW_BYTES",
    "FrameKind",
    "PathInfo",
    "SessionFrame",
    "SessionKind",
    "SessionOpen",
    "SessionOpened",
    "StatReply",
    "StatRequest",
    "decode_frame",
    "decode_session_open",
    "decode_session_opened",
    "decode_stat_reply",
    "decode_stat_request",
    "encode_session",
]

SessionKind = Literal["exec", "cp"]

FrameKind = Literal["text", "binary", "eof", "credit", "close", "error", "ping"]

#: Largest BINARY frame on a session subject (NATS' payload limit is 1 MiB by default).
MAX_CHUNK_BYTES: Final = 64 * 1024
#: Largest BINARY frame sent to a WebSocket client (hypeman sends <= 32 KiB frames).
CLIENT_CHUNK_BYTES: Final = 32 * 1024
#: Largest TEXT frame relayed either way; a bigger one ends the session with an error.
MAX_TEXT_BYTES: Final = 512 * 1024
#: Credit each receiver grants up front, in bytes.
WINDOW_BYTES: Final = 512 * 1024
PING_INTERVAL_S: Final = 2.0
IDLE_TIMEOUT_S: Final = 10.0


class SessionOpen(msgspec.Struct, frozen=True, kw_only=True):
    """Gateway → owning worker (core request): start a session on an instance."""

    session_id: str
    instance_id: str
    kind: SessionKind
    #: The token subject of the client, for the audit line in the instance's ops log.
    subject: str
    #: Credit the gateway grants the worker for frames towards the client.
    window: int
    #: The client's first frame (the exec or cp request) and whether it was TEXT.
    first: bytes
    first_text: bool


class SessionOpened(msgspec.Struct, frozen=True, kw_only=True):
    """Worker → gateway: the session is open (``window``: credit for frames towards the
    worker), or refused with ``error`` (not found, not running, agent not available)."""

    ok: bool
    window: int = 0
    error: ErrorInfo | None = None


class SessionFrame(msgspec.Struct, frozen=True, array_like=True):
    """One message on a session subject.

    ``text``/``binary``: a frame of the session (``data``); ``eof``: the client has no more
    input; ``credit``: the receiver grants ``credit`` more bytes; ``ping``: liveness;
    ``close``: clean end; ``error``: abnormal end, ``message`` says why.
    """

    kind: FrameKind
    data: bytes = b""
    credit: int = 0
    message: str = ""


class StatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Gateway → owning worker (core request to ``<p>.host.<host>.stat``)."""

    instance_id: str
    path: str
    follow_links: bool = False


class PathInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """hypeman's PathInfo, every field always present (as hypeman emits it)."""

    exists: bool
    is_dir: bool = False
    is_file: bool = False
    is_symlink: bool = False
    link_target: str = ""
    mode: int = 0
    size: int = 0
    error: str | None = None


class StatReply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    info: PathInfo | None = None
    error: ErrorInfo | None = None


_encoder: Final = msgspec.msgpack.Encoder()
_frame_decoder: Final = msgspec.msgpack.Decoder(SessionFrame)
_open_decoder: Final = msgspec.msgpack.Decoder(SessionOpen)
_opened_decoder: Final = msgspec.msgpack.Decoder(SessionOpened)
_stat_request_decoder: Final = msgspec.msgpack.Decoder(StatRequest)
_stat_reply_decoder: Final = msgspec.msgpack.Decoder(StatReply)


def encode_session(
    message: SessionOpen | SessionOpened | SessionFrame | StatRequest | StatReply,
) -> bytes:
    """msgpack, not JSON: BINARY frames carry raw bytes, which JSON would inflate by a third."""
    return _encoder.encode(message)


def decode_frame(data: bytes) -> SessionFrame:
    return _frame_decoder.decode(data)


def decode_session_open(data: bytes) -> SessionOpen:
    return _open_decoder.decode(data)


def decode_session_opened(data: bytes) -> SessionOpened:
    return _opened_decoder.decode(data)


def decode_stat_request(data: bytes) -> StatRequest:
    return _stat_request_decoder.decode(data)


def decode_stat_reply(data: bytes) -> StatReply:
    return _stat_reply_decoder.decode(data)
