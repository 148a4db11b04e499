"""Choosing the host for a new instance or volume, from the live hosts' heartbeats.

Instances go to the live host with the most free memory that fits the request (memory:
size + hotplug, as the workers count it; vCPUs: with an oversubscription ratio, as
hypeman's default of 4). A volume mount pins the instance to the volume's host. Volumes go
to the live host with the most free disk. [6/9] refines this; the interface stays.

Heartbeats lag: a host reports what it holds every few seconds. So this gateway remembers
what it placed itself and counts it against the host until a heartbeat written after the
command finished shows it (or a minute passes); two quick creates do not both take the
last free gigabyte. Other replicas' placements are not seen until the heartbeat.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.view import FleetView
from schemas.api import Hypervisor
from schemas.errors import HostUnavailable, NoCapacity
from schemas.messages import HostRecord

__all__ = ["Demand", "Placement"]

_RESERVATION_MAX_AGE_S = 60.0


@dataclass(frozen=True)
class Demand:
    """What one instance takes from its host."""

    vcpus: int
    memory_bytes: int
    hypervisor: Hypervisor


@dataclass
class _Reservation:
    demand: Demand
    made_at: float
    #: When the command finished (gateway clock); None while it runs.
    done_at: datetime | None = None


@dataclass
class Placement:
    view: FleetView
    cpu_oversubscription: float = 4.0
    clock: Callable[[], float] = time.monotonic
    _reserved: dict[str, list[_Reservation]] = field(default_factory=dict)

    def instance_host(
        self,
        demand: Demand,
        *,
        pinned_to: str | None = None,
        labels: dict[str, str] | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        """The host a new instance should run on; 503 when none can take it. ``exclude``:
        hosts that just refused it as full."""
        hosts = [
            h
            for h in self.view.live_hosts()
            if h.id not in exclude and h.id not in self.view.drains
        ]
        if pinned_to is not None and pinned_to in self.view.drains:
            raise NoCapacity(f"host {pinned_to} is drained: nothing new is placed there")
        if pinned_to is not None:
            host = next((h for h in hosts if h.id == pinned_to), None)
            if host is None:
                raise HostUnavailable(f"host {pinned_to} is not live")
            hosts = [host]
        if labels:
            hosts = [h for h in hosts if labels.items() <= h.labels.items()]
            if not hosts:
                wanted = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
                raise NoCapacity(f"no live host has the labels {wanted}")
        fitting = [h for h in hosts if self._fits(h, demand)]
        if not fitting:
            raise NoCapacity(_no_capacity_message(demand, hosts, pinned_to))
        return max(fitting, key=lambda h: (self._free_memory(h), h.id)).id

    def volume_host(self) -> str:
        """The live host with the most free disk."""
        hosts = [h for h in self.view.live_hosts() if h.id not in self.view.drains]
        if not hosts:
            raise NoCapacity("no live, undrained host to create the volume on")
        return max(hosts, key=lambda h: (h.disk_free_bytes, h.id)).id

    @contextlib.contextmanager
    def reserved(self, host_id: str, demand: Demand) -> Iterator[None]:
        """Count ``demand`` against the host while the create runs, and until the host's
        heartbeat has caught up with it."""
        reservation = _Reservation(demand, made_at=self.clock())
        self._reserved.setdefault(host_id, []).append(reservation)
        try:
            yield
        finally:
            reservation.done_at = datetime.now(UTC)

    def _fits(self, host: HostRecord, demand: Demand) -> bool:
        if host.hypervisors and demand.hypervisor not in host.hypervisors:
            return False
        return (
            self._free_memory(host) >= demand.memory_bytes
            and self._free_vcpus(host) >= demand.vcpus
        )

    def _free_memory(self, host: HostRecord) -> int:
        reserved = sum(r.demand.memory_bytes for r in self._pending(host))
        return host.memory_total_bytes - host.memory_allocated_bytes - reserved

    def _free_vcpus(self, host: HostRecord) -> float:
        reserved = sum(r.demand.vcpus for r in self._pending(host))
        total = host.vcpus_total * self.cpu_oversubscription
        return total - host.vcpus_allocated - reserved

    def _pending(self, host: HostRecord) -> list[_Reservation]:
        """The reservations the host's last heartbeat does not include yet."""
        now = self.clock()
        pending = [
            r
            for r in self._reserved.get(host.id, [])
            if now - r.made_at < _RESERVATION_MAX_AGE_S
            and (r.done_at is None or host.heartbeat_at <= r.done_at)
        ]
        if pending:
            self._reserved[host.id] = pending
        else:
            self._reserved.pop(host.id, None)
        return pending


def _no_capacity_message(demand: Demand, hosts: list[HostRecord], pinned_to: str | None) -> str:
    where = f"host {pinned_to}" if pinned_to else f"any of the {len(hosts)} live hosts"
    if not hosts:
        return "no live host can run instances"
    return (
        f"no capacity: {demand.vcpus} vCPUs and {demand.memory_bytes >> 20} MiB of memory "
        f"({demand.hypervisor.value}) do not fit on {where}"
    )
