"""Instance networking: addresses, NICs and port mappings, driver-neutral."""

from worker.network.ports import check_port_mappings, claim_host_ports
from worker.network.user import USER_GUEST_IP, NetworkSettings, mac_for, user_nic

__all__ = [
    "USER_GUEST_IP",
    "NetworkSettings",
    "check_port_mappings",
    "claim_host_ports",
    "mac_for",
    "user_nic",
]
