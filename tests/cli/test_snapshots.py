"""`vmfleet snapshot ls|rm` and `vmfleet fork` against a gateway with no host: the listing
shows the fleet's snapshot records, a missing snapshot is one refusal line and exit 1, and
a fork of a Running instance stops at its snapshot (no host takes it) with the same shape."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import anyio
import httpx
import nats
import pytest

from tests.gateway.test_snapshots import snapshot_record
from tests.support.gateway import Bus, instance_record, running_gateway

pytestmark = pytest.mark.anyio

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


async def test_snapshot_ls_rm_and_fork(nats_url: str) -> None:
    prefix = "c" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix) as gw:
        nc = await nats.connect(nats_url)
        try:
            bus = Bus(nc, prefix)
            await bus.put(bus.subjects.snapshots_bucket, "s-1", snapshot_record("s-1", name="warm"))
            await bus.put(bus.subjects.instances_bucket, "i-1", instance_record("i-1", "web", "h1"))
            async with httpx.AsyncClient(base_url=gw.base_url, headers=gw.headers) as client:
                with anyio.fail_after(10):
                    while (await client.get("/instances/i-1")).status_code != 200:
                        await anyio.sleep(0.05)
            env = {**os.environ, "HYPEMAN_BASE_URL": gw.base_url, "HYPEMAN_API_KEY": gw.token}

            async def vmfleet(*argv: str) -> tuple[int, str, str]:
                done = await anyio.run_process([VMFLEET, *argv], env=env, check=False)
                return done.returncode, done.stdout.decode(), done.stderr.decode()

            status, out, _ = await vmfleet("snapshot", "ls")
            assert status == 0
            header, row = out.strip().splitlines()
            assert header.split() == ["ID", "NAME", "KIND", "SOURCE", "SIZE", "HOSTS", "AGE"]
            assert row.split()[:3] == ["s-1", "warm", "Standby"]
            status, out, _ = await vmfleet("snapshot", "ls", "--kind", "Stopped")
            assert (status, out.strip().splitlines()[1:]) == (0, [])

            status, _, err = await vmfleet("snapshot", "rm", "nope")
            assert status == 1
            assert err.strip() == "vmfleet: not_found: snapshot nope not found"

            # The instance's host is not live: the snapshot is refused, nothing forked.
            status, out, err = await vmfleet("fork", "web", "--count", "2")
            assert (status, out) == (1, "")
            assert "host h1 is not available" in err
        finally:
            await nc.close()
