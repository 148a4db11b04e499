"""Counting inbound connections from the kernel's tables: real sockets for the user mode
(a listener in another process stands for QEMU's hostfwd), conntrack listings for the
bridge mode, and the policy's ignored ports and sources."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from schemas.api import PortMapping
from schemas.autostandby import AutoStandbySpec
from tests.worker.autostandby.double import record
from worker.autostandby.observe import (
    bridge_connections,
    counted,
    own_endpoints,
    parse_conntrack,
    parse_tcp_table,
    read_tcp_sockets,
    user_connections,
)
from worker.autostandby.registry import Connection

#: Listens on a free port, prints it, accepts and keeps every connection open.
_HOLDER = """
import socket, sys
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0)); server.listen(); print(server.getsockname()[1], flush=True)
held = []
while True:
    held.append(server.accept()[0])
"""
#: Connects to the port given, prints its own port, and holds the connection.
_CLIENT = """
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(c.getsockname()[1], flush=True)
time.sleep(600)
"""


@pytest.fixture
def listener() -> Iterator[int]:
    """A port held by another process, as QEMU holds a mapped host port."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def test_user_mode_counts_other_processes_clients_not_the_workers_own(listener: int) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, str(listener)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        client_port = int(client.stdout.readline())
        # This process's own connection: a health probe's, or the wake relay's.
        with socket.create_connection(("127.0.0.1", listener)) as probe:
            inst = record(
                "a",
                port_mappings=[PortMapping(guest_port=80, host_port=listener)],
                auto_standby=AutoStandbySpec(enabled=True, idle_timeout_s=10.0),
            )
            found = _connections_soon(inst, expected=1)
            assert found == {Connection(listener, "127.0.0.1", client_port)}
            assert probe.getsockname()[1] != client_port
            # An ignored guest port or source does not count at all.
            ignored_port = AutoStandbySpec(enabled=True, ignore_destination_ports=(80,))
            ignored_source = AutoStandbySpec(enabled=True, ignore_source_cidrs=("127.0.0.0/8",))
            for policy in (ignored_port, ignored_source):
                sockets = read_tcp_sockets()
                quiet = record("a", port_mappings=inst.port_mappings, auto_standby=policy)
                assert user_connections(quiet, sockets, own_endpoints(sockets)) == set()
    finally:
        client.kill()
        client.wait()


def _connections_soon(inst: object, expected: int) -> set[Connection]:
    """The kernel lists an accepted connection a moment after connect() returns."""
    deadline = time.monotonic() + 10
    while True:
        sockets = read_tcp_sockets()
        found = user_connections(inst, sockets, own_endpoints(sockets))  # type: ignore[arg-type]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_tcp_table_addresses_and_states() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid"
        "  timeout inode\n"
        "   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000"
        "     0        0 4242 1 0000000000000000 20 4 30 10 -1\n"
        "   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000200000A:0050 08"
        " 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000\n"
    )
    first, second = parse_tcp_table(text)
    assert (first.local, first.remote, first.state, first.inode) == (
        ("127.0.0.1", 8080),
        ("127.0.0.1", 54321),
        1,
        4242,
    )
    assert (second.local, second.remote, second.state) == (
        ("127.0.0.1", 8080),
        ("10.0.0.2", 80),
        8,
    )


GUEST = "10.100.0.5"
CONNTRACK = f"""\
ipv4     2 tcp      6 431999 ESTABLISHED src=198.51.100.7 dst={GUEST} sport=51000 dport=80 src={GUEST} dst=198.51.100.7 sport=80 dport=51000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=198.51.100.8 dst=203.0.113.1 sport=51001 dport=8080 src={GUEST} dst=198.51.100.8 sport=80 dport=51001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.8.0.9 dst={GUEST} sport=51002 dport=80 src={GUEST} dst=10.8.0.9 sport=80 dport=51002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=198.51.100.7 dst={GUEST} sport=51003 dport=22 src={GUEST} dst=198.51.100.7 sport=22 dport=51003 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=198.51.100.7 dst={GUEST} sport=51004 dport=80 src={GUEST} dst=198.51.100.7 sport=80 dport=51004 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 299 SYN_SENT src={GUEST} dst=93.184.216.34 sport=40000 dport=443 [UNREPLIED] src=93.184.216.34 dst=10.100.0.1 sport=443 dport=40000 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.100.0.1 dst={GUEST} sport=47000 dport=80 src={GUEST} dst=10.100.0.1 sport=80 dport=47000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=198.51.100.7 dst={GUEST} sport=5353 dport=53 src={GUEST} dst=198.51.100.7 sport=53 dport=5353 mark=0 zone=0 use=2
"""  # noqa: E501


def test_bridge_mode_counts_flows_to_the_guest_and_dnat_ones() -> None:
    flows = parse_conntrack(CONNTRACK)
    assert len(flows) == 7  # the UDP flow is not TCP
    policy = AutoStandbySpec(
        enabled=True, ignore_destination_ports=(22,), ignore_source_cidrs=("10.8.0.0/16",)
    )
    inst = record("a", ip=GUEST, auto_standby=policy)
    own = {("10.100.0.1", 47000)}  # the worker's own health probe
    assert bridge_connections(inst, flows, own) == {
        Connection(80, "198.51.100.7", 51000),
        Connection(8080, "198.51.100.8", 51001),  # DNAT: the guest answers
    }


def test_policy_exclusions() -> None:
    policy = AutoStandbySpec(
        enabled=True,
        ignore_destination_ports=(9000,),
        ignore_source_cidrs=("10.0.0.0/8", "2001:db8::/32"),
    )
    assert counted(policy, 8080, 80, "192.0.2.1")
    assert not counted(policy, 9000, 80, "192.0.2.1")  # the host port a client dialled
    assert not counted(policy, 8080, 9000, "192.0.2.1")  # the guest's port
    assert not counted(policy, 8080, 80, "10.1.2.3")
    assert not counted(policy, 8080, 80, "2001:db8::1")
    assert counted(None, 8080, 80, "10.1.2.3")


def test_the_worker_own_sockets_are_found() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            sockets = read_tcp_sockets()
            assert client.getsockname() in own_endpoints(sockets)


def test_sock_diag_and_the_proc_table_agree() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                ports = {server.getsockname()[1], client.getsockname()[1]}

                def ours(port: int, inode: int) -> bool:
                    return port in ports

                by_netlink = read_tcp_sockets(keep=ours)
                by_table = read_tcp_sockets(keep=ours, netlink=False)
    assert len(by_netlink) == 2
    assert sorted(by_netlink, key=str) == sorted(by_table, key=str)
