"""Reading QEMU 7.2's ``info usernet`` (the text as QEMU printed it on this machine)."""

from __future__ import annotations

from worker.wake.usernet import parse_usernet

INFO = (
    "Hub -1 (net0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]  13       127.0.0.1 47002       10.0.2.15    80     0     0\r\n"
    "  TCP[SYN_SENT]      15       127.0.0.1 47002       10.0.2.15    80     0     0\r\n"
    "  TCP[ESTABLISHED]   14       127.0.0.1 47001       10.0.2.15    80     0     0\r\n"
    "  UDP[236 sec]       16        10.0.2.15 68        10.0.2.2    67     0     0\r\n"
)


def test_each_tcp_socket_with_its_state_and_host_port() -> None:
    assert parse_usernet(INFO) == [
        ("HOST_FORWARD", 47002),
        ("SYN_SENT", 47002),
        ("ESTABLISHED", 47001),
    ]
