"""Port mappings: well-formed, not twice in one request, and free on this host."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

import anyio

from schemas.api import PortMapping
from schemas.errors import BadRequest, Conflict

__all__ = ["check_port_mappings", "claim_host_ports", "wait_until_released"]


def check_port_mappings(mappings: Iterable[PortMapping]) -> None:
    seen: set[tuple[str, int]] = set()
    for m in mappings:
        protocol = str(m.protocol or "tcp")
        for name, port in (("host_port", m.host_port), ("guest_port", m.guest_port)):
            if not 1 <= port <= 65535:
                raise BadRequest(
                    f"{name} {port} is not a port (1-65535)", code="invalid_port_mapping"
                )
        if protocol not in ("tcp", "udp"):
            raise BadRequest(
                f"protocol {protocol!r} must be tcp or udp", code="invalid_port_mapping"
            )
        if (protocol, m.host_port) in seen:
            raise BadRequest(
                f"host port {m.host_port}/{protocol} is mapped twice", code="invalid_port_mapping"
            )
        seen.add((protocol, m.host_port))


def claim_host_ports(
    mappings: Iterable[PortMapping], taken: set[tuple[str, int]], address: str
) -> None:
    """Refuse a host port another instance of this host holds (running or not: mappings
    survive stop/start) or that something else on the host is bound to."""
    for m in mappings:
        protocol = str(m.protocol or "tcp")
        if (protocol, m.host_port) in taken or not _bindable(address, m.host_port, protocol):
            raise Conflict(
                f"host port {m.host_port}/{protocol} is already in use on this host",
                code="port_in_use",
            )


async def wait_until_released(
    mappings: Iterable[PortMapping], address: str, timeout_s: float = 5.0
) -> bool:
    """Wait until the host can bind every mapped port again; False if it still cannot.

    A killed VMM's sockets linger for a moment while the kernel closes its connections;
    a create that claims the same port right after a delete would otherwise be refused.
    """
    pending = [(m.host_port, str(m.protocol or "tcp")) for m in mappings]
    with anyio.move_on_after(timeout_s):
        # The kernel offers no event for a port coming free: poll, briefly.
        while pending := _still_held(pending, address):  # noqa: ASYNC110
            await anyio.sleep(0.05)
        return True
    return False


def _still_held(ports: list[tuple[int, str]], address: str) -> list[tuple[int, str]]:
    return [(port, protocol) for port, protocol in ports if not _bindable(address, port, protocol)]


def _bindable(address: str, port: int, protocol: str) -> bool:
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            sock.bind((address, port))
            return True
    return False
