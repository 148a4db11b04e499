"""Run inside a network namespace of its own (tests/worker/autostandby/test_conntrack.py):
a "guest" address with a listener, a DNAT from another port to it, two
client connections (one direct, one through the DNAT), then what bridge mode's observer
makes of the real conntrack table. Prints one JSON line."""

from __future__ import annotations

import json
import socket
import subprocess

import anyio

from tests.worker.autostandby.double import record
from worker.autostandby.observe import (
    bridge_connections,
    own_endpoints,
    read_conntrack,
    read_tcp_sockets,
)

GUEST, CLIENT = "10.99.0.5", "10.99.0.1"
RULES = f"""
table ip vftest {{
  chain out {{ type nat hook output priority -100; tcp dport 8080 dnat to {GUEST}:80; }}
  chain in {{ type filter hook input priority 0; ct state established,related accept; }}
}}
"""


def _setup() -> None:
    for args in (
        ["link", "set", "lo", "up"],
        ["addr", "add", f"{GUEST}/32", "dev", "lo"],
        ["addr", "add", f"{CLIENT}/32", "dev", "lo"],
    ):
        subprocess.run(["ip", *args], check=True)
    subprocess.run(["nft", "-f", "-"], input=RULES, text=True, check=True)


def _client(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((CLIENT, 0))
    sock.connect((GUEST if port == 80 else CLIENT, port))
    return sock


async def main() -> None:
    _setup()
    server = socket.socket()
    server.bind((GUEST, 80))
    server.listen()
    clients = [_client(80), _client(8080)]
    accepted = [server.accept()[0] for _ in clients]
    flows = await read_conntrack()
    inst = record("a", ip=GUEST)
    counted = bridge_connections(inst, flows, set())
    sockets = read_tcp_sockets()
    own = bridge_connections(inst, flows, own_endpoints(sockets))
    print(json.dumps({"counted": sorted(counted), "own": sorted(own)}))
    for sock in [*clients, *accepted, server]:
        sock.close()


anyio.run(main)
