"""``bridge`` mode NAT with nftables: one table of vmfleet's own, never anyone else's rules.

The table (``inet vmfleet``) holds: masquerade for the subnet's egress, forward accepts for
the bridge (in case the host's forward policy drops), and, per instance, DNAT rules for its
port mappings in ``prerouting`` (traffic from outside) and ``output`` (from this host),
matching any local address. Every rule of an instance carries the comment
``vmfleet:<instance id>``, which is how it is found and removed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from schemas.api import PortMapping
from worker.network._cmd import run_tool

__all__ = ["Nat", "TaggedRule", "instance_rules", "rule_tag", "table_script", "wake_rules"]

TABLE = "vmfleet"
_TAG = "vmfleet:"


def rule_tag(instance_id: str) -> str:
    return _TAG + instance_id


def table_script(subnet: str, bridge: str, table: str = TABLE) -> str:
    """The table and its fixed rules; re-applying it leaves instance rules alone."""
    return "\n".join(
        [
            f"add table inet {table}",
            f"add chain inet {table} prerouting {{ type nat hook prerouting priority dstnat; }}",
            f"add chain inet {table} output {{ type nat hook output priority -100; }}",
            f"add chain inet {table} postrouting {{ type nat hook postrouting priority srcnat; }}",
            f"add chain inet {table} forward {{ type filter hook forward priority 0; }}",
            f"flush chain inet {table} postrouting",
            f"flush chain inet {table} forward",
            f"add rule inet {table} postrouting ip saddr {subnet} ip daddr != {subnet} masquerade",
            # Port mappings reached on this host's loopback (route_localnet on the bridge).
            f'add rule inet {table} postrouting ip saddr 127.0.0.0/8 oifname "{bridge}" masquerade',
            f'add rule inet {table} forward iifname "{bridge}" accept',
            f'add rule inet {table} forward oifname "{bridge}" accept',
            "",
        ]
    )


def instance_rules(
    instance_id: str, guest_ip: str, mappings: Iterable[PortMapping], table: str = TABLE
) -> str:
    """DNAT of each host port to the guest, in prerouting and output, tagged."""
    lines = []
    for m in mappings:
        protocol = str(m.protocol or "tcp")
        match = f"fib daddr type local {protocol} dport {m.host_port}"
        for chain in ("prerouting", "output"):
            lines.append(
                f"add rule inet {table} {chain} {match} dnat ip to {guest_ip}:{m.guest_port}"
                f' comment "{rule_tag(instance_id)}"'
            )
    return "\n".join(lines) + "\n" if lines else ""


def wake_rules(instance_id: str, guest_ip: str, wake_port: int, table: str = TABLE) -> str:
    """While the instance sleeps: every TCP connection to its guest address (from outside,
    and from this host) redirected to the worker's ``wake_port`` (worker.wake.catch)."""
    match = f"ip daddr {guest_ip} meta l4proto tcp redirect to :{wake_port}"
    return "".join(
        f'add rule inet {table} {chain} {match} comment "{rule_tag(instance_id)}"\n'
        for chain in ("prerouting", "output")
    )


@dataclass(frozen=True)
class TaggedRule:
    chain: str
    handle: int
    instance_id: str


class Nat:
    def __init__(self, subnet: str, bridge: str, table: str = TABLE) -> None:
        self.subnet, self.bridge, self.table = subnet, bridge, table

    async def setup(self) -> None:
        await _nft(table_script(self.subnet, self.bridge, self.table))

    async def add(self, instance_id: str, guest_ip: str, mappings: Iterable[PortMapping]) -> None:
        """The instance's rules, replacing any it had."""
        await self._replace(
            instance_id, instance_rules(instance_id, guest_ip, mappings, self.table)
        )

    async def asleep(self, instance_id: str, guest_ip: str, wake_port: int) -> None:
        """The instance's rules replaced by :func:`wake_rules` (no DNAT while it sleeps);
        the next :meth:`add` (the restore's plug) replaces them again."""
        await self._replace(instance_id, wake_rules(instance_id, guest_ip, wake_port, self.table))

    async def _replace(self, instance_id: str, script: str) -> None:
        """One nft transaction: no moment in which the instance has no rules at all (a
        connection then would find neither its DNAT nor the worker's redirect)."""
        stale = [r for r in await self.tagged() if r.instance_id == instance_id]
        script = self._deletes(stale) + script
        if script:
            await _nft(script)

    async def remove(self, instance_id: str) -> None:
        await self._delete(r for r in await self.tagged() if r.instance_id == instance_id)

    async def remove_others(self, keep: set[str]) -> set[str]:
        """Remove the rules of instances not in ``keep``; return whose were removed."""
        stale = [r for r in await self.tagged() if r.instance_id not in keep]
        await self._delete(stale)
        return {r.instance_id for r in stale}

    async def tagged(self) -> list[TaggedRule]:
        out = await run_tool(["nft", "-j", "list", "table", "inet", self.table], check=False)
        if out is None:
            return []
        rules = []
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            comment = rule.get("comment", "") if rule else ""
            if rule and comment.startswith(_TAG):
                rules.append(TaggedRule(rule["chain"], rule["handle"], comment[len(_TAG) :]))
        return rules

    async def _delete(self, rules: Iterable[TaggedRule]) -> None:
        if script := self._deletes(rules):
            await _nft(script)

    def _deletes(self, rules: Iterable[TaggedRule]) -> str:
        return "".join(
            f"delete rule inet {self.table} {r.chain} handle {r.handle}\n" for r in rules
        )


async def _nft(script: str) -> None:
    await run_tool(["nft", "-f", "-"], stdin=script.encode())
