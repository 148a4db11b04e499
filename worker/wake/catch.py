"""bridge mode: connections to a sleeping guest's own address, caught by the worker.

While a bridge-mode instance sleeps by its policy, its guest address has no TAP behind it.
The worker listens on one port of its own per sleeping instance, and nftables rules tagged
with the instance (:func:`worker.network.nat.wake_rules`) redirect every TCP connection to
the guest's address (any port, from this host or routed through it) to that port. The
kernel's connection tracking remembers where the client meant to go; the worker reads it
back with ``SO_ORIGINAL_DST`` and, once the guest runs, relays the connection to the guest
at that port. The restore's plug replaces the redirects with the instance's DNAT rules, so
after a wake traffic to the guest's address takes the kernel path again.
"""

from __future__ import annotations

import socket
import struct

__all__ = [
    "SO_ORIGINAL_DST",
    "listen_catch",
    "listen_tcp",
    "original_destination",
    "parse_sockaddr_in",
]

#: linux/netfilter_ipv4.h: the destination of a connection before NAT rewrote it.
SO_ORIGINAL_DST = 80
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, zero


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """(address, port) of a ``struct sockaddr_in`` as the kernel hands it out."""
    if len(raw) < _SOCKADDR_IN.size:
        raise ValueError(f"a sockaddr_in is {_SOCKADDR_IN.size} bytes, got {len(raw)}")
    port, address = _SOCKADDR_IN.unpack_from(raw)
    return socket.inet_ntoa(address), port


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client of an accepted connection meant to go; None if no NAT rule
    redirected it (someone connected to the worker's port directly)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    except OSError:
        return None
    return parse_sockaddr_in(raw)


def listen_catch() -> socket.socket:
    """The worker's port for one sleeping guest's address: any free port, on every address
    (a redirect from prerouting arrives on the address of the interface it came in on)."""
    return listen_tcp("0.0.0.0", 0)


def listen_tcp(address: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket, for the ports a sleeping instance is woken on."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
