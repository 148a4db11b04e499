"""``bridge`` mode: a Linux bridge per host, one TAP per running VM, NAT by nftables.

What exists when (instance by instance):

- Running: lease (IP + MAC), TAP ``vf<first 10 chars of the id>`` on the bridge, DNAT rules,
  and the bandwidth shapers of :mod:`worker.network.shaping` when it has limits.
- Standby: lease and rules; no TAP (the VMM is gone). Restore recreates the TAP with the same
  name, and the lease gives the same IP and MAC: the snapshot holds the guest's network.
- Stopped: the lease only. An instance keeps its address for as long as it exists, as in
  hypeman's API: a stopped instance still reports it, and a start boots on it again.
- Deleted: nothing.

Needs root, ``ip`` (iproute2) and ``nft`` (nftables). Only the bridge, the ``vf*`` TAPs on
it and vmfleet's own nftables table are ever touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from schemas.api import PortMapping
from schemas.errors import HypervisorError
from worker.drivers.base import NicSpec
from worker.network._cmd import run_tool
from worker.network.ipam import Ipam, Lease
from worker.network.nat import Nat
from worker.network.shaping import Bandwidth, ifb_name, ifbs, shape, unshape
from worker.network.user import NetworkSettings

__all__ = ["TAP_PREFIX", "BridgeNetwork", "check_bridge_host", "tap_name"]

TAP_PREFIX = "vf"


def tap_name(instance_id: str) -> str:
    """At most 15 characters (IFNAMSIZ - 1)."""
    return TAP_PREFIX + instance_id[:10]


def check_bridge_host() -> None:
    """Refuse, in one line, a host that cannot do bridge mode."""
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        raise HypervisorError("VMFLEET_NETWORK=bridge needs root (bridge, TAPs, nftables)")
    if missing:
        raise HypervisorError(
            f"VMFLEET_NETWORK=bridge needs {' and '.join(missing)} "
            "(Debian: apt-get install iproute2 nftables)"
        )


class BridgeNetwork:
    def __init__(self, settings: NetworkSettings, data_dir: Path) -> None:
        self.settings = settings
        self.bridge = settings.bridge
        self.ipam = Ipam(data_dir / "network" / "leases.json", settings.subnet)
        self.nat = Nat(str(self.ipam.network), self.bridge)

    # -- host --------------------------------------------------------------------------------

    async def setup(self) -> None:
        """The bridge with the gateway address, forwarding on, vmfleet's nftables table."""
        if await _ip("link", "show", "dev", self.bridge, check=False) is None:
            await _ip("link", "add", "name", self.bridge, "type", "bridge")
        gateway = f"{self.ipam.gateway}/{self.ipam.prefixlen}"
        await _ip("addr", "replace", gateway, "dev", self.bridge)
        await _ip("link", "set", "dev", self.bridge, "up")
        _sysctl("net/ipv4/ip_forward", "1")
        _sysctl(f"net/ipv4/conf/{self.bridge}/route_localnet", "1")
        await self.nat.setup()

    # -- one instance ------------------------------------------------------------------------

    def lease(self, instance_id: str) -> Lease:
        return self.ipam.allocate(instance_id)

    def nic(self, instance_id: str, tap: str) -> NicSpec:
        lease = self.ipam.lease(instance_id)
        assert lease is not None, f"{instance_id} has no lease"
        return NicSpec(id="net0", mac=lease.mac, mode="tap", tap=tap)

    async def plug(
        self,
        instance_id: str,
        tap: str,
        mappings: Iterable[PortMapping] = (),
        limits: Bandwidth | None = None,
    ) -> None:
        """The TAP on the bridge (made afresh), shaped to ``limits``, and the instance's DNAT
        rules."""
        lease = self.ipam.lease(instance_id)
        assert lease is not None, f"{instance_id} has no lease"
        await self.remove_tap(tap)
        await _ip("tuntap", "add", "dev", tap, "mode", "tap")
        try:
            await _ip("link", "set", "dev", tap, "master", self.bridge)
            await _ip("link", "set", "dev", tap, "up")
            await shape(tap, limits or Bandwidth())
            await self.nat.add(instance_id, lease.ip, mappings)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.remove_tap(tap)
            raise

    async def remove_tap(self, tap: str) -> None:
        await _ip("link", "del", "dev", tap, check=False)
        await unshape(tap)

    async def unplug(self, instance_id: str, tap: str | None) -> None:
        """TAP and rules gone, the lease kept (stop, a VMM gone, a failed start)."""
        if tap:
            await self.remove_tap(tap)
        await self.nat.remove(instance_id)

    async def release(self, instance_id: str, tap: str | None) -> None:
        """Everything of the instance: TAP, rules, lease (delete, a failed create)."""
        await self.unplug(instance_id, tap)
        self.ipam.release(instance_id)

    # -- leftovers ---------------------------------------------------------------------------

    async def taps(self) -> set[str]:
        out = await _ip("-j", "link", "show", "type", "tun", check=False)
        links = json.loads(out or b"[]")
        return {
            link["ifname"]
            for link in links
            if link["ifname"].startswith(TAP_PREFIX) and link.get("master") in (None, self.bridge)
        }

    async def remove_leftovers(
        self, *, keep_taps: set[str], keep: set[str], keep_leases: set[str] | None = None
    ) -> list[str]:
        """Remove TAPs (and their ifbs) not in ``keep_taps``, rules of instances not in
        ``keep``, and leases of instances not in ``keep_leases`` (default: ``keep``); return
        what was removed, for the log."""
        keep_leases = keep if keep_leases is None else keep_leases
        removed = []
        for tap in sorted(await self.taps() - keep_taps):
            await self.remove_tap(tap)
            removed.append(f"tap {tap}")
        for ifb in sorted(await ifbs() - {ifb_name(tap) for tap in keep_taps}):
            await _ip("link", "del", "dev", ifb, check=False)
            removed.append(f"ifb {ifb}")
        for instance_id in sorted(await self.nat.remove_others(keep)):
            removed.append(f"rules of {instance_id}")
        for lease in self.ipam.leases():
            if lease.instance_id not in keep_leases:
                self.ipam.release(lease.instance_id)
                removed.append(f"lease {lease.ip} of {lease.instance_id}")
        return removed


async def _ip(*args: str, check: bool = True) -> bytes | None:
    return await run_tool(["ip", *args], check=check)


def _sysctl(key: str, value: str) -> None:
    try:
        Path("/proc/sys", key).write_text(value)
    except OSError as exc:
        raise HypervisorError(f"cannot set {key.replace('/', '.')}={value}: {exc}") from exc
