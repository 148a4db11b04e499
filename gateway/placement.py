"""Choosing the host for a new instance or volume, from the live hosts' heartbeats.

An instance goes to a live, undrained host that fits it:

* capacity: vCPUs and memory (size + hotplug, as the workers count them) within the host's
  totals times the overcommit ratios (``VMFLEET_CPU_OVERCOMMIT``, default 4 as hypeman's;
  ``VMFLEET_MEMORY_OVERCOMMIT``, default 1), and its disk (overlay and volume overlays)
  within the host's free disk less what its sparse disks may still take;
* ports: none of its host ports held on that host (``HostRecord.ports``);
* the request's host (``host``, or the host of its volumes) and labels.

Among the hosts that fit, one that already has the image ready is preferred (a pull takes
far longer than any imbalance costs); among those, or among all when none has it, the one
with the most free memory (then vCPUs) wins, which spreads instances over the fleet. A
host that refuses the create anyway (``host_full``, ``port_in_use``: another gateway got
there first) is left out of the next try (``exclude``). Volumes go to the live host with
the most free disk.

Heartbeats lag: a host reports what it holds every few seconds. So this gateway remembers
what it placed itself and counts it against the host until a heartbeat written after the
command finished shows it (or a minute passes); two quick creates do not both take the
last free gigabyte. Other replicas' placements are not seen until the heartbeat; that
is why the worker checks again, counting the creates it is running, and refuses what
would over-commit it: two gateways placing at once never over-commit a host.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from gateway.view import FleetView
from schemas.api import Hypervisor
from schemas.clock import utc_now
from schemas.errors import Conflict, HostUnavailable, NoCapacity
from schemas.messages import DEFAULT_CPU_OVERCOMMIT, DEFAULT_MEMORY_OVERCOMMIT, HostRecord

__all__ = ["Demand", "Placement"]

_RESERVATION_MAX_AGE_S = 60.0


@dataclass(frozen=True)
class Demand:
    """What one instance takes from its host."""

    vcpus: int
    memory_bytes: int
    #: None: any hypervisor will do.
    hypervisor: Hypervisor | None
    #: Disk its sparse files may take: the overlay and the volume mounts' overlays.
    disk_bytes: int = 0
    #: The host ports it maps, as ``schemas.messages.host_port_key`` names them.
    ports: frozenset[str] = frozenset()
    #: It has bandwidth limits: only a host in bridge mode can enforce them.
    shaped_network: bool = False


@dataclass
class _Reservation:
    demand: Demand
    made_at: float
    #: When the command finished (gateway clock); None while it runs.
    done_at: datetime | None = None


@dataclass(frozen=True)
class _Room:
    """What a host can still take: its heartbeat less this gateway's pending reservations."""

    memory: float
    vcpus: float
    disk: int
    ports: frozenset[str]


def _fits(host: HostRecord, room: _Room, demand: Demand) -> bool:
    if demand.hypervisor and host.hypervisors and demand.hypervisor not in host.hypervisors:
        return False
    if demand.shaped_network and host.network_mode != "bridge":
        return False
    return (
        room.memory >= demand.memory_bytes
        and room.vcpus >= demand.vcpus
        and room.disk >= demand.disk_bytes
    )


@dataclass
class Placement:
    view: FleetView
    cpu_overcommit: float = DEFAULT_CPU_OVERCOMMIT
    memory_overcommit: float = DEFAULT_MEMORY_OVERCOMMIT
    clock: Callable[[], float] = time.monotonic
    _reserved: dict[str, list[_Reservation]] = field(default_factory=dict)
    #: Bumped whenever a host's reservations change: a cached room is then stale.
    _versions: dict[str, int] = field(default_factory=dict)
    #: host → (the heartbeat it was worked out from, the reservations' version, until
    #: when it holds (the oldest reservation in it ages out), the room).
    _rooms: dict[str, tuple[HostRecord, int, float, _Room]] = field(default_factory=dict)

    def instance_host(
        self,
        demand: Demand,
        *,
        pinned_to: str | None = None,
        labels: dict[str, str] | None = None,
        exclude: frozenset[str] = frozenset(),
        images: frozenset[str] = frozenset(),
        prefer: frozenset[str] = frozenset(),
    ) -> str:
        """The host a new instance should run on; 503 when none can take it, 409
        ``port_in_use`` when some could but all hold one of its host ports. ``exclude``:
        hosts that just refused it; ``images``: the image's name and digest (hosts that
        list one of them in their heartbeat have it ready); ``prefer``: hosts that win
        over all others that fit (a snapshot's hosts, for a fork: no transfer)."""
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
        # Each host's room is worked out once per placement: the reservations to count
        # grow with the rate of creates, and every criterion below needs them.
        room = {h.id: self._room(h) for h in hosts}
        fitting = [h for h in hosts if _fits(h, room[h.id], demand)]
        if not fitting:
            raise NoCapacity(_no_capacity_message(demand, hosts, pinned_to, len(exclude)))
        free_ports = [h for h in fitting if not demand.ports & room[h.id].ports]
        if not free_ports:
            taken = sorted({p for h in fitting for p in demand.ports & room[h.id].ports})
            where = f"host {pinned_to}" if pinned_to else "every host that could run it"
            raise Conflict(
                f"host port {', '.join(taken)} is already in use on {where}", code="port_in_use"
            )
        warm = [h for h in free_ports if h.id in prefer] or [
            h for h in free_ports if images & set(h.images)
        ]
        return max(warm or free_ports, key=lambda h: (room[h.id].memory, room[h.id].vcpus, h.id)).id

    def volume_host(self, size_bytes: int = 0) -> str:
        """The live host with the most free disk (less what its sparse disks may take);
        none when no host could hold ``size_bytes``, before anything is sent."""
        hosts = self._open_hosts("create the volume on")
        best = max(hosts, key=lambda h: (_disk_room(h), h.id))
        if size_bytes > _disk_room(best):
            raise NoCapacity(
                f"no host has room for a volume of {size_bytes} bytes: the most any host "
                f"can still take is {max(_disk_room(best), 0)} bytes"
            )
        return best.id

    def image_host(self) -> str:
        """Where a new image is pulled first: the live, undrained host with the most free
        disk (the other hosts pull it on demand)."""
        hosts = self._open_hosts("pull the image on")
        return max(hosts, key=lambda h: (_disk_room(h), h.id)).id

    def _open_hosts(self, purpose: str) -> list[HostRecord]:
        hosts = [h for h in self.view.live_hosts() if h.id not in self.view.drains]
        if not hosts:
            waiting = (
                ""
                if self.view.live_hosts()
                else " (a fresh fleet has none until a worker's first heartbeat: see GET /ready)"
            )
            raise NoCapacity(f"no live, undrained host to {purpose}{waiting}")
        return hosts

    @contextlib.contextmanager
    def reserved(self, host_id: str, demand: Demand) -> Iterator[None]:
        """Count ``demand`` against the host while the create runs, and until the host's
        heartbeat has caught up with it."""
        reservation = _Reservation(demand, made_at=self.clock())
        self._reserved.setdefault(host_id, []).append(reservation)
        self._changed(host_id)
        try:
            yield
        finally:
            reservation.done_at = utc_now()
            self._changed(host_id)

    def _changed(self, host_id: str) -> None:
        self._versions[host_id] = self._versions.get(host_id, 0) + 1

    def _room(self, host: HostRecord) -> _Room:
        """The host's room, worked out again only when its heartbeat or its reservations
        changed or one of them aged out: a create looks at every host, and most of them
        have not changed since the last create."""
        version = self._versions.get(host.id, 0)
        cached = self._rooms.get(host.id)
        if (
            cached is not None
            and cached[0] is host
            and cached[1] == version
            and self.clock() < cached[2]
        ):
            return cached[3]
        pending = self._pending(host)
        room = self._room_left(host, pending)
        holds_until = min((r.made_at for r in pending), default=math.inf) + _RESERVATION_MAX_AGE_S
        self._rooms[host.id] = (host, version, holds_until, room)
        return room

    def _room_left(self, host: HostRecord, pending: list[_Reservation]) -> _Room:
        return _Room(
            memory=host.memory_total_bytes * self.memory_overcommit
            - host.memory_allocated_bytes
            - sum(r.demand.memory_bytes for r in pending),
            vcpus=host.vcpus_total * self.cpu_overcommit
            - host.vcpus_allocated
            - sum(r.demand.vcpus for r in pending),
            disk=host.disk_free_bytes
            - host.disk_promised_bytes
            - sum(r.demand.disk_bytes for r in pending),
            ports=frozenset(host.ports).union(*(r.demand.ports for r in pending)),
        )

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


def _disk_room(host: HostRecord) -> int:
    """Disk a host can still give: free, less what its sparse files may still take."""
    return host.disk_free_bytes - host.disk_promised_bytes


def _no_capacity_message(
    demand: Demand, hosts: list[HostRecord], pinned_to: str | None, refused: int
) -> str:
    """``hosts``: the live, undrained candidates, less the ``refused`` that turned it down."""
    others = f" ({refused} more refused it just now)" if refused else ""
    if not hosts:
        return f"no live, undrained host can run instances{others}"
    where = f"host {pinned_to}" if pinned_to else f"any of the {len(hosts)} live hosts{others}"
    under = f" under {demand.hypervisor.value}" if demand.hypervisor else ""
    return (
        f"no capacity: {demand.vcpus} vCPUs, {demand.memory_bytes >> 20} MiB of memory and "
        f"{demand.disk_bytes >> 20} MiB of disk{under} do not fit on {where}"
    )
