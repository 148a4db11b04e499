"""Inbound connections that the worker itself accepts for an instance: the wake listener
holds them while the instance sleeps and relays them afterwards. The kernel shows such a
connection as the worker's own socket, which the observer leaves out (it is vmfleet's own
traffic), so the listener reports it here instead."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

__all__ = ["Connection", "InboundRegistry"]


class Connection(NamedTuple):
    """One inbound TCP connection, as both the registry and the observer key it."""

    host_port: int
    peer_ip: str
    peer_port: int


class InboundRegistry:
    """What the wake listener reports; read by the auto-standby controller. Calls never
    block and never raise (they run inside the listener's accept and close paths)."""

    def __init__(self) -> None:
        self._open: defaultdict[str, set[Connection]] = defaultdict(set)

    def opened(self, instance_id: str, host_port: int, peer_ip: str, peer_port: int) -> None:
        self._open[instance_id].add(Connection(host_port, peer_ip, peer_port))

    def closed(self, instance_id: str, host_port: int, peer_ip: str, peer_port: int) -> None:
        held = self._open.get(instance_id)
        if held is None:
            return
        held.discard(Connection(host_port, peer_ip, peer_port))
        if not held:
            del self._open[instance_id]

    def connections(self, instance_id: str) -> frozenset[Connection]:
        return frozenset(self._open.get(instance_id, ()))

    def count(self, instance_id: str) -> int:
        return len(self._open.get(instance_id, ()))
