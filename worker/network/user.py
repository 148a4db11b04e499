"""``user`` mode: QEMU's user-mode network stack. No root, no bridge: the guest has QEMU's
fixed addresses (10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3; set statically, which spares
the boot a DHCP exchange), egress goes through the host's sockets, and port mappings are
forwarded from the host's loopback (or ``VMFLEET_PUBLISH_ADDR``) into the guest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schemas.api import PortMapping
from worker.drivers.base import NicSpec, PortForward

__all__ = [
    "USER_DNS",
    "USER_GATEWAY",
    "USER_GUEST_IP",
    "USER_PREFIXLEN",
    "NetworkSettings",
    "mac_for",
    "user_nic",
]

#: The address QEMU's user-mode DHCP would hand the guest, in its /24.
USER_GUEST_IP = "10.0.2.15"
USER_PREFIXLEN = 24
#: QEMU's user-mode router and DNS forwarder (its defaults: no ``net=`` is given).
USER_GATEWAY = "10.0.2.2"
USER_DNS = "10.0.2.3"


@dataclass(frozen=True)
class NetworkSettings:
    mode: str = "user"
    #: Where port mappings listen on the host (user mode).
    publish_addr: str = "127.0.0.1"
    #: bridge mode: the instances' subnet (the gateway is its first address), the bridge's
    #: name, and the DNS server the guests are told to use.
    subnet: str = "10.100.0.0/16"
    bridge: str = "vmfleet0"
    dns: str = "1.1.1.1"


def mac_for(instance_id: str) -> str:
    """A stable, locally administered unicast MAC (02:…): the same across standby/restore
    and restarts, distinct per instance."""
    digest = hashlib.sha256(instance_id.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def user_nic(instance_id: str, mappings: list[PortMapping], settings: NetworkSettings) -> NicSpec:
    forwards = tuple(
        PortForward(
            protocol=str(m.protocol or "tcp"),
            host_addr=settings.publish_addr,
            host_port=m.host_port,
            guest_port=m.guest_port,
        )
        for m in mappings
    )
    return NicSpec(id="net0", mac=mac_for(instance_id), mode="user", forwards=forwards)
