"""An instance's network across operations (bridge mode; user mode needs nothing here).

- :func:`take_address`: the lease (IP + MAC) and TAP name, recorded; before a boot.
- :func:`guest_network` / :func:`nics`: what the config disk and the VMM are given.
- :func:`release_network`: TAP, rules and lease gone (stop, delete, a failed create/start).
"""

from __future__ import annotations

from worker.drivers.base import NicSpec
from worker.guest import GuestNetwork
from worker.lifecycle.context import LocalInstance, OpContext
from worker.network import tap_name, user_nic

__all__ = ["guest_network", "nics", "plug", "release_network", "take_address"]


def take_address(ctx: OpContext, inst: LocalInstance) -> None:
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    lease = ctx.bridge.lease(inst.id)
    ctx.save(inst, ip=lease.ip, mac=lease.mac, tap=tap_name(inst.id))


def guest_network(ctx: OpContext, inst: LocalInstance) -> GuestNetwork:
    record = inst.record
    if ctx.bridge is None or not record.network_enabled:
        # user mode: QEMU's DHCP gives the guest its address, gateway and DNS.
        return GuestNetwork(enabled=record.network_enabled, mode="dhcp")
    return GuestNetwork(
        enabled=True,
        mode="static",
        ip=record.ip,
        cidr=ctx.bridge.ipam.prefixlen,
        gw=ctx.bridge.ipam.gateway,
        dns=(ctx.network.dns,),
    )


def nics(ctx: OpContext, inst: LocalInstance) -> tuple[NicSpec, ...]:
    record = inst.record
    if not record.network_enabled:
        return ()
    if ctx.bridge is None:
        return (user_nic(inst.id, list(record.port_mappings), ctx.network),)
    assert record.tap is not None
    return (ctx.bridge.nic(inst.id, record.tap),)


async def plug(ctx: OpContext, inst: LocalInstance, tap: str | None = None) -> None:
    """The TAP (``tap``: the one a snapshot's device model names) and the DNAT rules."""
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    tap = tap or inst.record.tap
    assert tap is not None
    await ctx.bridge.plug(inst.id, tap, inst.record.port_mappings)


async def release_network(ctx: OpContext, inst: LocalInstance, *, record: bool = True) -> None:
    """Give up the TAP, the rules and the lease; ``record``: clear ip/tap in the record."""
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    await ctx.bridge.release(inst.id, inst.record.tap)
    if record:
        ctx.save(inst, ip=None, tap=None)
