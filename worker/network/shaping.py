"""Bandwidth limits of a bridge-mode instance, with ``tc`` on its TAP.

- Download (towards the guest) leaves the host through the TAP: a ``tbf`` qdisc as the TAP's
  root shapes it.
- Upload (from the guest) enters the host through the TAP, and a qdisc only shapes what a
  device sends. The TAP's ingress is redirected (``u32`` match-all + ``mirred``) to an
  ``ifb`` device of its own (:func:`ifb_name`), whose root ``tbf`` shapes it. Policing the
  ingress would be one device less, but drops instead of queueing, and ``act_police`` is
  often not built (the test machines lack it; ``mirred`` and ``ifb`` are there).

Both are made whenever the TAP is (create, start, restore) and go with it: deleting a TAP
drops its qdiscs, and :func:`unshape` deletes the ifb. Rates are bytes/s, as in the record;
``tc`` is given bits/s (its ``bps`` unit means bytes, an easy mistake to make).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from worker.network._cmd import run_tool

__all__ = ["IFB_PREFIX", "Bandwidth", "ifb_name", "ifbs", "shape", "unshape"]

#: The prefix of the ifb devices vmfleet makes; ``vi`` + the TAP's own suffix.
IFB_PREFIX = "vi"
#: How long a packet may wait in a shaper's queue before it is dropped.
LATENCY = "100ms"
#: The smallest bucket: a few full frames, whatever the rate.
MIN_BURST_BYTES = 16 << 10


@dataclass(frozen=True)
class Bandwidth:
    """An instance's limits in bytes/s; 0: unlimited."""

    download_bps: int = 0
    upload_bps: int = 0

    @property
    def limited(self) -> bool:
        return self.download_bps > 0 or self.upload_bps > 0


def ifb_name(tap: str) -> str:
    """The ifb that shapes ``tap``'s upload; as short as the TAP's name (IFNAMSIZ)."""
    return IFB_PREFIX + tap[2:]


async def shape(tap: str, limits: Bandwidth) -> None:
    """Apply ``limits`` to a TAP that exists and is up (nothing when unlimited)."""
    if limits.download_bps > 0:
        await _tbf(tap, limits.download_bps)
    if limits.upload_bps > 0:
        ifb = ifb_name(tap)
        await unshape(tap)
        await _tool("ip", "link", "add", "name", ifb, "type", "ifb")
        await _tool("ip", "link", "set", "dev", ifb, "up")
        await _tbf(ifb, limits.upload_bps)
        await _tool("tc", "qdisc", "replace", "dev", tap, "handle", "ffff:", "ingress")
        await _tool(
            "tc", "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1",
            "u32", "match", "u32", "0", "0",
            "action", "mirred", "egress", "redirect", "dev", ifb,
        )  # fmt: skip


async def unshape(tap: str) -> None:
    """Remove what :func:`shape` made beside the TAP (its own qdiscs go with the TAP)."""
    await run_tool(["ip", "link", "del", "dev", ifb_name(tap)], check=False)


async def ifbs() -> set[str]:
    """The ifb devices vmfleet made on this host (or namespace)."""
    out = await run_tool(["ip", "-j", "link", "show", "type", "ifb"], check=False)
    return {
        link["ifname"] for link in json.loads(out or b"[]") if link["ifname"].startswith(IFB_PREFIX)
    }


async def _tbf(dev: str, rate_bps: int) -> None:
    burst = max(rate_bps // 8, MIN_BURST_BYTES)  # an eighth of a second's worth
    await _tool(
        "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
        "rate", f"{rate_bps * 8}bit", "burst", str(burst), "latency", LATENCY,
    )  # fmt: skip


async def _tool(*argv: str) -> None:
    await run_tool(list(argv))
