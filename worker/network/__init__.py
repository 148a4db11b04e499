"""Instance networking: addresses, NICs and port mappings, driver-neutral."""

from worker.network.bridge import TAP_PREFIX, BridgeNetwork, check_bridge_host, tap_name
from worker.network.ipam import Ipam, Lease
from worker.network.nat import Nat
from worker.network.ports import check_port_mappings, claim_host_ports
from worker.network.user import USER_GUEST_IP, NetworkSettings, mac_for, user_nic

__all__ = [
    "TAP_PREFIX",
    "USER_GUEST_IP",
    "BridgeNetwork",
    "Ipam",
    "Lease",
    "Nat",
    "NetworkSettings",
    "check_bridge_host",
    "check_port_mappings",
    "claim_host_ports",
    "mac_for",
    "tap_name",
    "user_nic",
]
