"""QEMU user-mode networking at runtime, through HMP over QMP: add the public forwards
back after a wake, and tell whether the guest took a connection made through a forward.

slirp accepts a forwarded connection on the host at once and only then sends the SYN to
the guest, so a successful ``connect`` says nothing about the guest. ``info usernet`` lists
slirp's sockets with their TCP state: while the guest has not answered, the connection is
``SYN_SENT``; a guest that refuses it makes slirp close the host socket (the client reads
EOF). So: connect, wait until no connection through that forward is in SYN_SENT any more,
and see whether ours reads EOF.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import anyio
from anyio.abc import SocketStream

from worker.drivers.base import PortForward
from worker.drivers.qmp import QmpClient, QmpError, open_qmp
from worker.wake.sleeper import GuestNotListening

__all__ = ["UserNet", "parse_usernet"]

_ROW = re.compile(r"TCP\[(\w+)\]\s+-?\d+\s+(\S+)\s+(\d+)\s+(\S+)\s+(\d+)")

#: How long a guest may take to answer slirp's SYN before the try counts as refused.
ANSWER_TIMEOUT_S = 5.0


def parse_usernet(text: str) -> list[tuple[str, int]]:
    """``(state, host port)`` of every TCP socket slirp lists (a forwarded connection's host
    port is the forward's own port)."""
    return [(m.group(1), int(m.group(3))) for m in _ROW.finditer(text)]


class UserNet:
    def __init__(self, qmp_socket: Path) -> None:
        self._qmp_socket = qmp_socket

    async def connect(self, forward_port: int) -> SocketStream:
        """A connection through the loopback forward ``forward_port`` that the guest
        accepted; GuestNotListening if it refused."""
        stream = await anyio.connect_tcp("127.0.0.1", forward_port)
        try:
            async with open_qmp(self._qmp_socket) as qmp:
                with anyio.fail_after(ANSWER_TIMEOUT_S):
                    await _until_answered(qmp, forward_port)
            if _reads_eof(stream):
                raise GuestNotListening(f"the guest refused the connection via {forward_port}")
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def add_forwards(self, nic_id: str, forwards: Iterable[PortForward]) -> None:
        async with open_qmp(self._qmp_socket) as qmp:
            for fwd in forwards:
                rule = f"{fwd.protocol}:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}"
                answer = await _hmp(qmp, f"hostfwd_add {nic_id} {rule}")
                if answer.strip():  # HMP says nothing when it worked
                    raise QmpError(f"hostfwd_add {rule}: {answer.strip()}")


async def _hmp(qmp: QmpClient, command: str) -> str:
    return str(await qmp.execute("human-monitor-command", {"command-line": command}))


async def _until_answered(qmp: QmpClient, forward_port: int) -> None:
    """Until slirp has taken our connection (two answers of QEMU's main loop after the
    connect) and no connection through ``forward_port`` waits for the guest's SYN-ACK."""
    answers = 0
    while True:
        rows = parse_usernet(await _hmp(qmp, "info usernet"))
        answers += 1
        waiting = any(state == "SYN_SENT" and port == forward_port for state, port in rows)
        if answers >= 2 and not waiting:
            return
        await anyio.sleep(0.005)  # each look takes QEMU's big lock from the guest: not too often


def _reads_eof(stream: SocketStream) -> bool:
    """A peek that does not wait (the stream's own socket object is the event loop's
    wrapper, which has no recv: a duplicate of its descriptor peeks at the same socket)."""
    fd = stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno()
    with socket.socket(fileno=os.dup(fd)) as sock:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
