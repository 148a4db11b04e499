"""This network namespace's TCP sockets through ``NETLINK_SOCK_DIAG``: the kernel sends
only sockets in the states asked for, as fixed binary records, so a host with thousands
of TIME_WAIT sockets costs a tick little. ``/proc/net/tcp`` is the fallback
(:func:`worker.autostandby.observe.read_tcp_sockets`)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Final

__all__ = ["SockDiagError", "dump_tcp"]

_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x01
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_HEADER: Final = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
#: inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_REQUEST: Final = struct.Struct("=BBBxI48x")
#: inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big endian),
#: src[16], dst[16], if, cookie[8]; expires, rqueue, wqueue, uid, inode.
_MESSAGE: Final = struct.Struct("=BBBBHH16s16sI8sIIIII")
_PORTS: Final = struct.Struct(">HH")
_RECV_BYTES: Final = 1 << 16

Row = tuple[tuple[str, int], tuple[str, int], int, int]


class SockDiagError(OSError):
    """The kernel did not answer the dump (no sock_diag for this family, or refused)."""


def dump_tcp(states: int) -> list[Row]:
    """(local, remote, state, inode) of every TCP socket in ``states`` (a bitmask of
    ``1 << state``), IPv4 and IPv6."""
    rows: list[Row] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            _request(nl, family, states, seq)
            rows.extend(_replies(nl, family, seq))
    return rows


def _request(nl: socket.socket, family: int, states: int, seq: int) -> None:
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, states)
    header = _HEADER.pack(
        _HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
    )
    nl.sendto(header + body, (0, 0))


def _replies(nl: socket.socket, family: int, seq: int) -> list[Row]:
    rows: list[Row] = []
    while True:
        data = nl.recv(_RECV_BYTES)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, got_seq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                raise SockDiagError("a malformed netlink message")
            body = offset + _HEADER.size
            if kind == _NLMSG_DONE and got_seq == seq:
                return rows
            if kind == _NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", data, body)
                if errno == 0:
                    return rows
                raise SockDiagError(-errno, os.strerror(-errno))
            if got_seq == seq and length >= _HEADER.size + _MESSAGE.size:
                rows.append(_row(data, body, family))
            offset += (length + 3) & ~3


def _row(data: bytes, at: int, family: int) -> Row:
    _, state, _, _, _, _, src, dst, _, _, _, _, _, _, inode = _MESSAGE.unpack_from(data, at)
    sport, dport = _PORTS.unpack_from(data, at + 4)
    return (_address(family, src), sport), (_address(family, dst), dport), state, inode


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip)
