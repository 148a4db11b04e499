"""bridge mode nftables rules as rendered (applied for real in test_bridge_mode.py)."""

from __future__ import annotations

from schemas.api import PortMapping
from worker.network.nat import instance_rules, table_script


def test_table_script_is_idempotent_and_masquerades_the_subnet() -> None:
    script = table_script("10.100.0.0/16", "vmfleet0")
    assert script.startswith("add table inet vmfleet\n")
    assert "delete table" not in script  # re-applying keeps the instances' rules
    masquerade = "ip saddr 10.100.0.0/16 ip daddr != 10.100.0.0/16 masquerade"
    assert f"add rule inet vmfleet postrouting {masquerade}" in script
    assert "flush chain inet vmfleet prerouting" not in script
    assert 'forward iifname "vmfleet0" accept' in script


def test_instance_rules_dnat_in_prerouting_and_output_tagged() -> None:
    rules = instance_rules(
        "abc",
        "10.100.0.7",
        [
            PortMapping(host_port=8080, guest_port=80),
            PortMapping(host_port=53, guest_port=5353, protocol="udp"),
        ],
    ).splitlines()
    tag = 'comment "vmfleet:abc"'
    tcp = "fib daddr type local tcp dport 8080 dnat ip to 10.100.0.7:80"
    udp = "fib daddr type local udp dport 53 dnat ip to 10.100.0.7:5353"
    assert rules == [
        f"add rule inet vmfleet prerouting {tcp} {tag}",
        f"add rule inet vmfleet output {tcp} {tag}",
        f"add rule inet vmfleet prerouting {udp} {tag}",
        f"add rule inet vmfleet output {udp} {tag}",
    ]
    assert instance_rules("abc", "10.100.0.7", []) == ""
