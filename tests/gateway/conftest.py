"""Gateways for the tests: one without hosts (per test), and one fleet shared by the tests
that boot VMs: a real `vmfleet worker` behind a real gateway, on a prefix of their own."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from tests.support.fleet import WorkerProcess
from tests.support.gateway import Bus, GatewayHandle, running_gateway


@pytest.fixture
def gw(nats_url: str, subject_prefix: str) -> Iterator[GatewayHandle]:
    """A gateway of an empty fleet (no host): for everything that needs no VM."""
    with running_gateway(nats_url, subject_prefix) as handle:
        yield handle


@pytest.fixture(scope="module")
def shared_gw(nats_url: str) -> Iterator[GatewayHandle]:
    """One hostless gateway for a module whose tests change nothing."""
    with running_gateway(nats_url, "m" + secrets.token_hex(4)) as handle:
        yield handle


@dataclass(frozen=True)
class Fleet:
    nats_url: str
    prefix: str
    worker: WorkerProcess
    api: GatewayHandle


@pytest.fixture(scope="session")
def fleet(nats_url: str, test_assets: Path) -> Iterator[Fleet]:
    """One worker and one gateway for every VM test of the gateway; instances left over
    by a test are deleted at the end, the worker's VMs killed if need be."""
    prefix = "g" + secrets.token_hex(4)
    worker = WorkerProcess(nats_url, prefix, test_assets)
    worker.start()
    try:
        with running_gateway(nats_url, prefix) as api:
            _wait_for_host(api, worker.host_id)
            yield Fleet(nats_url, prefix, worker, api)
            _delete_everything(api)
    finally:
        worker.cleanup()


def _wait_for_host(api: GatewayHandle, host_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    with api.client() as client:
        while time.monotonic() < deadline:
            if any(h["id"] == host_id for h in client.get("/hosts").json()):
                return
            time.sleep(0.2)
    raise AssertionError(f"worker {host_id} never showed up in GET /hosts")


def _delete_everything(api: GatewayHandle) -> None:
    with api.client() as client:
        for instance in client.get("/instances").json():
            client.delete(f"/instances/{instance['id']}")
        for volume in client.get("/volumes").json():
            client.delete(f"/volumes/{volume['id']}")


@pytest.fixture
async def bus(nats_url: str, subject_prefix: str, gw: GatewayHandle) -> AsyncIterator[Bus]:
    """Direct NATS access to ``gw``'s fleet (its streams and buckets exist by then)."""
    nc = await nats.connect(nats_url)
    try:
        yield Bus(nc, subject_prefix)
    finally:
        await nc.close()
