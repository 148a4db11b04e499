"""bridge mode's catch of a sleeping guest's address, without a VM: the nftables rules as
rendered, the kernel's sockaddr_in, and a catch port that refuses what no redirect brought
(the redirect itself is exercised for real in tests/worker/network/test_bridge_mode.py)."""

from __future__ import annotations

import socket
import struct

import anyio
import pytest

from tests.worker.wake.test_sleeper import FakeWorker, _ask
from worker.network.nat import wake_rules
from worker.wake.catch import listen_catch, original_destination, parse_sockaddr_in
from worker.wake.sleeper import Listener, Sleeper, WakeSettings


def test_wake_rules_redirect_all_tcp_to_the_guest_address_in_both_chains() -> None:
    rules = wake_rules("abc", "10.100.0.7", 41234).splitlines()
    match = "ip daddr 10.100.0.7 meta l4proto tcp redirect to :41234"
    assert rules == [
        f'add rule inet vmfleet prerouting {match} comment "vmfleet:abc"',
        f'add rule inet vmfleet output {match} comment "vmfleet:abc"',
    ]


def test_sockaddr_in_as_the_kernel_hands_it_out() -> None:
    # family AF_INET in host order, then port and address in network order, 8 zero bytes
    raw = struct.pack("=H", socket.AF_INET) + bytes.fromhex("1fbb0a7c0002") + bytes(8)
    assert parse_sockaddr_in(raw) == ("10.124.0.2", 8123)
    with pytest.raises(ValueError, match="16 bytes"):
        parse_sockaddr_in(raw[:6])


def test_a_connection_no_redirect_brought_has_no_original_destination() -> None:
    server = listen_catch()
    server.setblocking(True)
    with server, socket.create_connection(("127.0.0.1", server.getsockname()[1])):
        accepted, _ = server.accept()
        with accepted:
            assert original_destination(accepted) is None


@pytest.mark.anyio
async def test_the_catch_port_closes_what_was_not_meant_for_the_guest(
    anyio_backend: str,
) -> None:
    worker = FakeWorker(guest_port=1)
    sock = listen_catch()
    port = sock.getsockname()[1]
    sleeper = Sleeper(
        "inst-1", [Listener(port, 0, sock, catch_ip="10.100.0.7")], worker, WakeSettings()
    )
    worker.sleeper = sleeper
    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper.run)
        assert await _ask(port, b"hello") == b""
        sleeper.close()
    assert worker.restores == 0 and worker.open == 0
