"""An instance's network across operations (bridge mode; user mode needs nothing here).

- :func:`take_address`: the lease (IP + MAC) and TAP name, recorded; before a boot. An
  instance keeps its lease for as long as it exists: a start boots on the same address.
- :func:`guest_network` / :func:`nics`: what the config disk and the VMM are given.
- :func:`plug`: the TAP, shaped to the instance's bandwidth limits, and its DNAT rules.
- :func:`unplug`: TAP and rules gone, the address kept (stop, a VMM that exited, a failed
  start).
- :func:`release_network`: everything gone, the lease too (delete, a failed create).
- :func:`check_network_limits`: a bandwidth limit this host cannot enforce is refused.
"""

from __future__ import annotations

from schemas.errors import BadRequest
from schemas.messages import Create
from worker.drivers.base import NicSpec
from worker.guest import GuestNetwork
from worker.lifecycle.context import LocalInstance, OpContext
from worker.network import tap_name, user_nic
from worker.network.shaping import Bandwidth
from worker.network.user import USER_DNS, USER_GATEWAY, USER_GUEST_IP, USER_PREFIXLEN

__all__ = [
    "check_network_limits",
    "guest_network",
    "nics",
    "plug",
    "release_network",
    "take_address",
    "unplug",
]


def check_network_limits(ctx: OpContext, cmd: Create) -> None:
    """User mode has no device to shape: QEMU's own network stack moves the packets."""
    if ctx.bridge is not None or not cmd.network_enabled:
        return
    for field, value in (
        ("bandwidth_download", cmd.bandwidth_download_bps),
        ("bandwidth_upload", cmd.bandwidth_upload_bps),
    ):
        if value > 0:
            raise BadRequest(
                f"network.{field} cannot be enforced in the user network mode of host "
                f"{ctx.host_id}: leave it out, or use a host in bridge mode",
                code="not_supported",
            )


def take_address(ctx: OpContext, inst: LocalInstance) -> None:
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    lease = ctx.bridge.lease(inst.id)
    ctx.save(inst, ip=lease.ip, mac=lease.mac, tap=tap_name(inst.id))


def guest_network(ctx: OpContext, inst: LocalInstance) -> GuestNetwork:
    record = inst.record
    if not record.network_enabled:
        return GuestNetwork(enabled=False)
    if ctx.bridge is None:
        # user mode: QEMU's fixed addresses, given as they are (no DHCP round trips at boot).
        return GuestNetwork(
            enabled=True,
            mode="static",
            ip=USER_GUEST_IP,
            cidr=USER_PREFIXLEN,
            gw=USER_GATEWAY,
            dns=(USER_DNS,),
        )
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
    """The TAP (``tap``: the one a snapshot's device model names), its shapers, and the
    DNAT rules."""
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    tap = tap or inst.record.tap
    assert tap is not None
    record = inst.record
    limits = Bandwidth(
        download_bps=record.bandwidth_download_bps, upload_bps=record.bandwidth_upload_bps
    )
    await ctx.bridge.plug(inst.id, tap, record.port_mappings, limits)


async def unplug(ctx: OpContext, inst: LocalInstance) -> None:
    """Give up the TAP and the rules; the lease (and the record's ip and mac) stay."""
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    await ctx.bridge.unplug(inst.id, inst.record.tap)


async def release_network(ctx: OpContext, inst: LocalInstance, *, record: bool = True) -> None:
    """Give up the TAP, the rules and the lease; ``record``: clear ip/tap in the record."""
    if ctx.bridge is None or not inst.record.network_enabled:
        return
    await ctx.bridge.release(inst.id, inst.record.tap)
    if record:
        ctx.save(inst, ip=None, tap=None)
