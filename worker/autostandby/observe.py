"""Inbound TCP connections of this host's instances, read from the kernel once per tick.

- **user mode**: QEMU's hostfwd accepts a client on the mapped host port inside the QEMU
  process, so a connection is a TCP socket of this network namespace whose local port is
  one of the instance's mapped host ports (``/proc/self/net/tcp`` and ``tcp6``).
- **bridge mode**: the guest has its own address; a connection is a conntrack flow whose
  original destination is that address, or which a port mapping's DNAT sent there (its
  reply comes from the guest). ``/proc/net/nf_conntrack``, else ``conntrack -L``.

A socket counts while its client is there (not once the client sent its FIN; in bridge
mode, any conntrack state but NONE, TIME_WAIT and CLOSE, as hypeman counts), so a
connection held open without a byte keeps the instance awake. vmfleet's own
traffic (health probes, the wake relay's leg to the guest) comes from sockets of this
worker process and is left out: its endpoints are read from ``/proc/self/fd``.
Nothing here depends on the hypervisor.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from schemas.autostandby import AutoStandbySpec
from schemas.messages import InstanceRecord
from worker.autostandby.registry import Connection
from worker.autostandby.sockdiag import dump_tcp
from worker.run import CommandFailed, run_command

__all__ = [
    "ConntrackFlow",
    "ObserverError",
    "TcpSocket",
    "bridge_connections",
    "counted",
    "own_endpoints",
    "own_inodes",
    "parse_conntrack",
    "parse_tcp_table",
    "read_conntrack",
    "read_tcp_sockets",
    "user_connections",
]

#: Kernel TCP states (include/net/tcp_states.h) of a connection whose client is still
#: there: established, being set up (SYN_RECV, NEW_SYN_RECV), or closed by the server side
#: only (FIN_WAIT1/2). Once the client has sent its FIN (CLOSE_WAIT, LAST_ACK, CLOSING) it
#: has gone, whatever the guest still has to say.
_OPEN_STATES: Final = frozenset({0x01, 0x03, 0x04, 0x05, 0x0C})
#: conntrack's TCP states that are no longer a connection (as hypeman counts).
_CLOSED_FLOWS: Final = frozenset({"NONE", "TIME_WAIT", "CLOSE"})
#: What the sock_diag dump asks for: open connections and those being opened (a probe's
#: own socket may still be connecting), not LISTEN, TIME_WAIT or CLOSE.
_DUMP_STATES: Final = sum(1 << s for s in (0x01, 0x02, 0x03, 0x04, 0x05, 0x08, 0x09, 0x0B, 0x0C))
_CONNTRACK_PROC: Final = Path("/proc/net/nf_conntrack")
_CONNTRACK_TIMEOUT_S: Final = 5.0

Endpoint = tuple[str, int]
#: Which rows of the socket table to decode, by (local port, inode): decoding addresses is
#: most of a tick's cost, and only the mapped ports and the worker's own sockets matter.
Keep = Callable[[int, int], bool]


class ObserverError(RuntimeError):
    """The kernel's table could not be read (the status reports ``observer_error``)."""


# -- the socket table (user mode) ---------------------------------------------------------


@dataclass(frozen=True)
class TcpSocket:
    local: Endpoint
    remote: Endpoint
    state: int
    inode: int


def read_tcp_sockets(
    proc: Path = Path("/proc"), keep: Keep | None = None, *, netlink: bool = True
) -> list[TcpSocket]:
    """The TCP sockets of this network namespace (IPv4 and IPv6) that may be connections;
    only those ``keep`` wants, if given. sock_diag when the kernel answers it (the usual
    case, and much cheaper on a busy host), else (or with ``netlink`` False) the proc
    tables."""
    if netlink:
        try:
            rows = dump_tcp(_DUMP_STATES)
        except OSError:
            pass  # no sock_diag here: the proc tables say the same, slower
        else:
            return [
                TcpSocket(local=local, remote=remote, state=state, inode=inode)
                for local, remote, state, inode in rows
                if keep is None or keep(local[1], inode)
            ]
    sockets: list[TcpSocket] = []
    for name in ("tcp", "tcp6"):
        try:
            text = (proc / "self" / "net" / name).read_text()
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        except OSError as exc:
            raise ObserverError(f"cannot read the socket table: {exc}") from exc
        sockets.extend(s for s in parse_tcp_table(text, keep) if (1 << s.state) & _DUMP_STATES)
    return sockets


def parse_tcp_table(text: str, keep: Keep | None = None) -> list[TcpSocket]:
    """The rows of a ``/proc/net/tcp{,6}`` table (its header line is skipped)."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        if keep is not None and not keep(int(fields[1].rpartition(":")[2], 16), int(fields[9])):
            continue
        rows.append(
            TcpSocket(
                local=_endpoint(fields[1]),
                remote=_endpoint(fields[2]),
                state=int(fields[3], 16),
                inode=int(fields[9]),
            )
        )
    return rows


def _endpoint(text: str) -> Endpoint:
    """``0100007F:1F90`` -> ``("127.0.0.1", 8080)``: the address is in host byte order,
    32 bits at a time."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    ip = ipaddress.ip_address(socket.inet_ntop(family, swapped))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener's IPv4 client
    return str(ip), int(port, 16)


def own_endpoints(
    sockets: Iterable[TcpSocket], proc: Path = Path("/proc"), inodes: set[int] | None = None
) -> set[Endpoint]:
    """Local endpoints of this process's own TCP sockets: its probes and relays."""
    mine = own_inodes(proc) if inodes is None else inodes
    return {s.local for s in sockets if s.inode in mine and s.inode != 0}


def own_inodes(proc: Path = Path("/proc")) -> set[int]:
    """The inodes of this process's open sockets."""
    inodes: set[int] = set()
    try:
        for entry in os.scandir(proc / "self" / "fd"):
            try:
                target = os.readlink(entry.path)
            except OSError:
                continue  # closed while we looked
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError as exc:
        raise ObserverError(f"cannot list the worker's own sockets: {exc}") from exc
    return inodes


def user_connections(
    record: InstanceRecord, sockets: Iterable[TcpSocket], own: set[Endpoint]
) -> set[Connection]:
    """The instance's open inbound connections on its mapped host ports."""
    ports = _mapped(record)
    found: set[Connection] = set()
    for s in sockets:
        host_port = s.local[1]
        if host_port not in ports or s.state not in _OPEN_STATES:
            continue
        if s.remote in own or s.local in own:
            continue  # the worker's own traffic (or its own listener's accepted socket)
        if counted(record.auto_standby, host_port, ports[host_port], s.remote[0]):
            found.add(Connection(host_port, *s.remote))
    return found


def _mapped(record: InstanceRecord) -> dict[int, int]:
    return {m.host_port: m.guest_port for m in record.port_mappings if m.protocol == "tcp"}


# -- conntrack (bridge mode) --------------------------------------------------------------


@dataclass(frozen=True)
class ConntrackFlow:
    state: str
    src: Endpoint
    dst: Endpoint
    #: Who answers: the guest, also when a DNAT rewrote the destination.
    reply_src: Endpoint


async def read_conntrack(path: Path = _CONNTRACK_PROC) -> list[ConntrackFlow]:
    """The host's TCP flows: the proc table if the kernel has it, else the tool."""
    try:
        return parse_conntrack(path.read_text())
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ObserverError(f"cannot read {path}: {exc}") from exc
    tool = shutil.which("conntrack")
    if tool is None:
        raise ObserverError(f"no {path} and no conntrack tool (apt install conntrack)")
    try:
        out = await run_command(
            [tool, "-L", "-p", "tcp", "-o", "extended"], timeout_s=_CONNTRACK_TIMEOUT_S
        )
    except CommandFailed as exc:
        raise ObserverError(f"conntrack -L failed: {exc}") from exc
    return parse_conntrack(out.decode(errors="replace"))


def parse_conntrack(text: str) -> list[ConntrackFlow]:
    """TCP flows of a ``nf_conntrack`` table or ``conntrack -L -o extended`` listing."""
    flows = []
    for line in text.splitlines():
        tokens = line.split()
        if "tcp" not in tokens[:4]:
            continue
        # "ipv4 2 tcp 6 <timeout> <STATE> src=.. dst=.. sport=.. dport=.. src=.. ..."
        at = tokens.index("tcp")
        if len(tokens) < at + 4:
            continue
        pairs = [t.split("=", 1) for t in tokens[at + 3 :] if "=" in t]
        values: dict[str, list[str]] = {}
        for key, value in pairs:
            values.setdefault(key, []).append(value)
        try:
            flows.append(
                ConntrackFlow(
                    state=tokens[at + 3],
                    src=(values["src"][0], int(values["sport"][0])),
                    dst=(values["dst"][0], int(values["dport"][0])),
                    reply_src=(values["src"][1], int(values["sport"][1])),
                )
            )
        except (KeyError, IndexError, ValueError):
            continue  # not a full TCP flow line
    return flows


def bridge_connections(
    record: InstanceRecord, flows: Iterable[ConntrackFlow], own: set[Endpoint]
) -> set[Connection]:
    """The instance's open inbound flows: to its address, or DNATed to it."""
    ip = record.ip
    found: set[Connection] = set()
    if ip is None:
        return found
    for flow in flows:
        if flow.state in _CLOSED_FLOWS:
            continue
        if flow.dst[0] != ip and flow.reply_src[0] != ip:
            continue
        if flow.src[0] == ip or flow.src in own:
            continue  # the guest's own outbound traffic, or the worker's
        guest_port = flow.reply_src[1]
        if counted(record.auto_standby, flow.dst[1], guest_port, flow.src[0]):
            found.add(Connection(flow.dst[1], *flow.src))
    return found


# -- the policy's exclusions --------------------------------------------------------------


def counted(policy: AutoStandbySpec | None, host_port: int, guest_port: int, peer: str) -> bool:
    """Whether the policy lets a connection keep the instance awake: its port (the guest's,
    or the mapped host port a client dialled) and its source are not ignored."""
    if policy is None:
        return True
    ignored = policy.ignore_destination_ports
    if guest_port in ignored or host_port in ignored:
        return False
    if not policy.ignore_source_cidrs:
        return True
    address = ipaddress.ip_address(peer)
    return not any(address in ipaddress.ip_network(c) for c in policy.ignore_source_cidrs)
