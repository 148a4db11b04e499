"""`vmfleet host drain|undrain` against a gateway, with hypeman's client settings."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import anyio
import httpx
import nats
import pytest

from tests.support.gateway import Bus, host_record, running_gateway

pytestmark = pytest.mark.anyio

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


async def test_drain_then_undrain(nats_url: str) -> None:
    prefix = "c" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix) as gw:
        nc = await nats.connect(nats_url)
        try:
            bus = Bus(nc, prefix)
            await bus.put(bus.subjects.hosts_bucket, "h1", host_record("h1"))
            async with httpx.AsyncClient(base_url=gw.base_url, headers=gw.headers) as client:
                with anyio.fail_after(10):
                    while not (await client.get("/hosts")).json():
                        await anyio.sleep(0.05)
            env = {**os.environ, "HYPEMAN_BASE_URL": gw.base_url, "HYPEMAN_API_KEY": gw.token}
            drained = await anyio.run_process(
                [VMFLEET, "host", "drain", "h1"], env=env, check=False
            )
            assert drained.returncode == 0, drained.stderr
            assert drained.stdout.decode().strip() == "host h1 drained"
            undrained = await anyio.run_process(
                [VMFLEET, "host", "undrain", "h1"], env=env, check=False
            )
            assert undrained.returncode == 0
            again = await anyio.run_process(
                [VMFLEET, "host", "undrain", "h1"], env=env, check=False
            )
            assert again.returncode == 1
            assert again.stderr.decode().strip() == "vmfleet: not_found: host h1 is not drained"
            no_key = {k: v for k, v in env.items() if k != "HYPEMAN_API_KEY"}
            refused = await anyio.run_process(
                [VMFLEET, "host", "drain", "h1"], env=no_key, check=False
            )
            assert refused.returncode == 2 and b"HYPEMAN_API_KEY" in refused.stderr
        finally:
            await nc.close()
