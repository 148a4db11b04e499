"""Inbound connections that the worker itself accepts for an instance: the wake listener
holds them while the instance sleeps and relays them afterwards. The kernel shows such a
connection as the worker's own socket, which the observer leaves out (it is vmfleet's own
traffic), so the listener reports it here instead. Also the instance's open exec and cp
sessions, which an idle standby waits for."""

from __future__ import annotations

from collections import Counter, defaultdict
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
        self._sessions: Counter[str] = Counter()

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

    # Exec and cp sessions are the agent's traffic, not inbound connections: they do not
    # keep the clock from running, but an idle standby waits until none is open, so that
    # it never freezes a user's command half-way.

    def session_changed(self, instance_id: str, delta: int) -> None:
        self._sessions[instance_id] += delta
        if self._sessions[instance_id] <= 0:
            del self._sessions[instance_id]

    def in_session(self, instance_id: str) -> bool:
        return self._sessions.get(instance_id, 0) > 0
