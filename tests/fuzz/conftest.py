"""Fleets to fuzz, and a way to read what their buckets hold while a sync test runs.

Two fleets, each on a real gateway and a real NATS server, with a subject prefix of its
own:

* ``hostless``: no host at all. A request that passes every check ends in 503
  ``no_capacity`` / ``host_unavailable``, and nothing can legitimately create an instance,
  a volume, an image or a drain record.
* ``one_fake_host``: one ``FakeHost`` that heartbeats and pulls images as the worker
  contract says, and answers nothing else (a create or volume command times out: 504).
  Here a ``POST /images`` answered 2xx legitimately creates an image record.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio.from_thread
import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from natsbus import live_entries
from schemas.codec import decode_drain_record, decode_image_record
from schemas.messages import DrainRecord, ImageRecord
from schemas.subjects import Subjects
from tests.support.gateway import FakeHost, GatewayHandle, running_gateway

FAKE_HOST = "fuzzhost"


@dataclass(frozen=True)
class Records:
    """What a fleet's buckets hold, by key."""

    instances: frozenset[str]
    volumes: frozenset[str]
    images: dict[str, ImageRecord]
    drains: dict[str, DrainRecord]
    #: Names of the uploads in the archives object store.
    archives: frozenset[str]


class FleetRecords:
    """Reads the instances, volumes, images and drains buckets and the archives store of
    one fleet, from a sync test: the NATS client lives on an event loop of its own (a
    blocking portal)."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, nc: Client, prefix: str) -> None:
        self.portal = portal
        self.nc = nc
        self.subjects = Subjects(prefix)

    def read(self) -> Records:
        return self.portal.call(self._read)

    async def _read(self) -> Records:
        s = self.subjects
        images = await self._values(s.images_bucket)
        drains = await self._values(s.drains_bucket)
        return Records(
            instances=frozenset(await self._values(s.instances_bucket)),
            volumes=frozenset(await self._values(s.volumes_bucket)),
            images={key: decode_image_record(value) for key, value in images.items()},
            drains={key: decode_drain_record(value) for key, value in drains.items()},
            archives=await self._archives(),
        )

    async def _archives(self) -> frozenset[str]:
        js = self.nc.jetstream()
        info = await js.stream_info(f"OBJ_{self.subjects.archives_bucket}")
        if info.state.messages == 0:
            return frozenset()
        store = await js.object_store(self.subjects.archives_bucket)
        try:
            objects = await store.list(ignore_deletes=True)
        except NotFoundError:  # raised when the store holds nothing
            return frozenset()
        return frozenset(o.name for o in objects if not o.deleted)

    async def clear(self) -> None:
        """Remove every image and drain record and every upload (what the fuzzed
        requests may leave)."""
        js = self.nc.jetstream()
        for bucket in (self.subjects.images_bucket, self.subjects.drains_bucket):
            kv = await js.key_value(bucket)
            for key in await self._values(bucket):
                await kv.delete(key)
        store = await js.object_store(self.subjects.archives_bucket)
        for name in await self._archives():
            await store.delete(name)

    async def _values(self, bucket: str) -> dict[str, bytes]:
        """Live keys and their values; one request when the bucket was never written."""
        js = self.nc.jetstream()
        info = await js.stream_info(f"KV_{bucket}")
        if info.state.messages == 0:
            return {}
        return dict(await live_entries(js, bucket))


@dataclass
class FuzzFleet:
    """A gateway, its buckets, and the creations its answers allowed so far."""

    api: GatewayHandle
    records: FleetRecords
    #: Normalised names a ``POST /images`` was answered 2xx for.
    accepted_images: set[str] = field(default_factory=set)
    #: Hosts a ``POST /hosts/{id}/drain`` was answered 2xx for.
    accepted_drains: set[str] = field(default_factory=set)
    #: Uploads answered 504: their archive stays in the store for the queued command.
    queued_uploads: int = 0

    def reset(self) -> None:
        """Back to the fleet as it started (no image, no drain), in the gateway's view too,
        so that each generated sequence starts from the same state."""
        self.records.portal.call(self.records.clear)
        self.accepted_images.clear()
        self.accepted_drains.clear()
        self.queued_uploads = 0
        deadline = time.monotonic() + 10
        with self.api.client() as client:
            while (
                any(h["drained"] for h in client.get("/hosts").json())
                or client.get("/images").json()
            ):
                assert time.monotonic() < deadline, "the gateway's view kept a reset record"
                time.sleep(0.02)


@contextlib.contextmanager
def _fleet(nats_url: str, *, fake_host: bool, **config: object) -> Iterator[FuzzFleet]:
    prefix = "f" + secrets.token_hex(4)
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        running_gateway(nats_url, prefix, **config) as api,
    ):
        nc = portal.call(nats.connect, nats_url)
        host_task = None
        try:
            if fake_host:
                host = FakeHost(nc, prefix, FAKE_HOST)
                host.pull_delay_s = 0.02
                host_task, _ = portal.start_task(host.run)
                _wait_until_listed(api)
            yield FuzzFleet(api, FleetRecords(portal, nc, prefix))
        finally:
            if host_task is not None:
                host_task.cancel()
            portal.call(nc.close)


def _wait_until_listed(api: GatewayHandle, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    with api.client() as client:
        while not client.get("/hosts").json():
            assert time.monotonic() < deadline, "the fake host never showed up in GET /hosts"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def hostless(nats_url: str) -> Iterator[FuzzFleet]:
    with _fleet(nats_url, fake_host=False) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def one_fake_host(nats_url: str) -> Iterator[FuzzFleet]:
    # The fake host never answers a create: a short timeout keeps each such step short.
    with _fleet(nats_url, fake_host=True, command_timeout_s=0.5) as fleet:
        yield fleet
