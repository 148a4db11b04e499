"""The framing of the agent channel (docs/agent-protocol.md): constants, encoding, parsing.

Kept in step with guest-agent/proto.go.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator

from worker.agent.errors import AgentProtocolError

__all__ = [
    "FRAME_COST",
    "GRANT_AT",
    "HEADER",
    "MAGIC",
    "MAX_DATA",
    "MAX_TEXT",
    "SYNC",
    "VERSION",
    "WINDOW",
    "FrameParser",
    "Kind",
    "RawFrame",
    "cost",
    "encode",
]

MAGIC = 0xA9
HEADER = struct.Struct(">BBII")  # magic, type, session id, payload length
#: Realigns a stream cut in the middle of a frame; every (re)start begins with it.
SYNC = b"\xa9\x00vmfleet-agent-sync\x00\xa9"
VERSION = 1
MAX_DATA = 64 << 10  # a BINARY frame's payload
MAX_TEXT = 1 << 20  # a TEXT frame's payload (JSON is never split); also NATS's payload limit
#: Every session may send WINDOW bytes beyond what its receiver granted; a frame costs its
#: payload plus FRAME_COST, so many tiny frames are bounded too.
WINDOW = 256 << 10
FRAME_COST = 64
GRANT_AT = 32 << 10


class Kind(enum.IntEnum):
    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    GONE = 0x04  # the guest's init: the agent died
    OPEN = 0x10
    TEXT = 0x11
    BINARY = 0x12
    EOF = 0x13
    CREDIT = 0x14
    END = 0x15
    ABORT = 0x16


_KINDS = {k.value for k in Kind}


class RawFrame:
    __slots__ = ("kind", "payload", "sid")

    def __init__(self, kind: int, sid: int, payload: bytes) -> None:
        self.kind = kind
        self.sid = sid
        self.payload = payload

    def __repr__(self) -> str:
        return f"RawFrame({self.kind:#x}, sid={self.sid}, {len(self.payload)} bytes)"


def cost(payload_len: int) -> int:
    return payload_len + FRAME_COST


def encode(kind: Kind, sid: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_TEXT:
        raise AgentProtocolError(f"frame payload of {len(payload)} bytes is over {MAX_TEXT}")
    return HEADER.pack(MAGIC, kind, sid, len(payload)) + payload


class FrameParser:
    """Frames out of a byte stream. It starts unsynced: bytes are dropped until SYNC, which
    the agent sends before its HELLO; a framing error makes it look for the next SYNC."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.synced = False
        self.dropped = 0

    def feed(self, data: bytes) -> Iterator[RawFrame]:
        self._buf += data
        while True:
            frame = self._next()
            if frame is None:
                return
            yield frame

    def _next(self) -> RawFrame | None:
        buf = self._buf
        while True:
            if not self.synced:
                at = buf.find(SYNC)
                if at < 0:
                    keep = len(SYNC) - 1
                    if len(buf) > keep:
                        self.dropped += len(buf) - keep
                        del buf[: len(buf) - keep]
                    return None
                self.dropped += at
                del buf[: at + len(SYNC)]
                self.synced = True
                continue
            if len(buf) < HEADER.size:
                return None
            magic, kind, sid, size = HEADER.unpack_from(buf)
            if magic != MAGIC or kind not in _KINDS or size > MAX_TEXT:
                self.synced = False  # a SYNC right here, or garbage: realign
                continue
            if len(buf) < HEADER.size + size:
                return None
            payload = bytes(buf[HEADER.size : HEADER.size + size])
            del buf[: HEADER.size + size]
            return RawFrame(kind, sid, payload)
