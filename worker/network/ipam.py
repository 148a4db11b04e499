"""``bridge`` mode addresses: one IP and one MAC per instance, from the host's subnet.

The gateway (the bridge's own address) is the subnet's first host address; instances get
the lowest free address after it. Leases live in one JSON file under the data dir, written
atomically, so allocation survives worker restarts. An instance asking again gets its own
lease back: its old lease never blocks it (stop releases it anyway; standby keeps it, and
restore must find the same IP and MAC the snapshot holds).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import msgspec

from schemas.errors import NoCapacity
from worker.network.user import mac_for
from worker.storage import write_atomic

__all__ = ["Ipam", "Lease"]


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    ip: str
    mac: str


class _LeaseFile(msgspec.Struct, kw_only=True):
    subnet: str
    leases: list[Lease] = msgspec.field(default_factory=list)


class Ipam:
    def __init__(self, path: Path, subnet: str) -> None:
        self.path = path
        self.network = ipaddress.IPv4Network(subnet, strict=False)
        if self.network.num_addresses < 4:
            raise ValueError(f"subnet {subnet} is too small (at least a /30)")
        #: The bridge's address, the guests' default route.
        self.gateway = str(self.network.network_address + 1)
        self._leases: dict[str, Lease] = {lease.instance_id: lease for lease in self._load()}

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def lease(self, instance_id: str) -> Lease | None:
        return self._leases.get(instance_id)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def allocate(self, instance_id: str) -> Lease:
        """The instance's lease: its own if it has one, else the lowest free address."""
        own = self._leases.get(instance_id)
        if own is not None:
            return own
        used_ips = {lease.ip for lease in self._leases.values()}
        used_macs = {lease.mac for lease in self._leases.values()}
        ip = next(
            (
                str(a)
                for a in self.network.hosts()
                if str(a) != self.gateway and str(a) not in used_ips
            ),
            None,
        )
        if ip is None:
            raise NoCapacity(
                f"no free address left in {self.network} ({len(self._leases)} leased)",
                code="no_free_address",
            )
        mac = mac_for(instance_id)
        salt = 0
        while mac in used_macs:
            salt += 1
            mac = mac_for(f"{instance_id}#{salt}")
        lease = Lease(instance_id=instance_id, ip=ip, mac=mac)
        self._leases[instance_id] = lease
        self._save()
        return lease

    def release(self, instance_id: str) -> Lease | None:
        lease = self._leases.pop(instance_id, None)
        if lease is not None:
            self._save()
        return lease

    def _load(self) -> list[Lease]:
        try:
            data = msgspec.json.decode(self.path.read_bytes(), type=_LeaseFile)
        except FileNotFoundError:
            return []
        # Leases outside the configured subnet (it was changed) cannot be honoured.
        return [
            lease
            for lease in data.leases
            if ipaddress.IPv4Address(lease.ip) in self.network and lease.ip != self.gateway
        ]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = _LeaseFile(
            subnet=str(self.network),
            leases=sorted(self._leases.values(), key=lambda lease: ipaddress.IPv4Address(lease.ip)),
        )
        write_atomic(self.path, msgspec.json.encode(data))
