"""A real instance's tags, usage and expiry through hypeman's SDK: one guest, which ends
deleted by its ttl while its worker is SIGKILLed at the deadline, exactly once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import nats
import pytest
from hypeman import BadRequestError, Hypeman, NotFoundError
from nats.js.api import DeliverPolicy

from schemas.codec import decode_state_event
from schemas.messages import StateEvent
from schemas.subjects import Subjects
from tests.gateway.conftest import Fleet

pytestmark = pytest.mark.vm

MIB = 1 << 20


def _gone(client: Hypeman, instance_id: str, timeout_s: float = 180) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            client.instances.get(instance_id)
        except NotFoundError:
            return True
        time.sleep(0.5)
    return False


async def _state_events(nats_url: str, prefix: str, instance_id: str) -> list[StateEvent]:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(
            Subjects(prefix).state_filter(instance=instance_id),
            deliver_policy=DeliverPolicy.ALL,
            ordered_consumer=True,
        )
        events = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                return events
            events.append(decode_state_event(msg.data))
    finally:
        await nc.close()


def test_tags_stats_update_and_expiry_with_the_worker_killed(
    fleet: Fleet, busybox_image: str
) -> None:
    client = Hypeman(api_key=fleet.api.token, base_url=fleet.api.base_url, max_retries=0)
    created = client.instances.create(
        name="expiring",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        tags={"team": "infra", "run": "ci-1"},
        ttl="1h",
        cmd=["/bin/sh", "-c", "sleep 3600"],
    )
    instance_id = created.id
    try:
        assert created.state == "Running" and created.tags == {"team": "infra", "run": "ci-1"}
        assert created.expires_at is not None
        assert created.expires_at - created.created_at <= timedelta(hours=1)
        assert created.expires_at - created.created_at > timedelta(minutes=59)
        listed = client.instances.list(tags={"team": "infra", "run": "ci-1"}, state="Running")
        assert [i.id for i in listed] == [instance_id]
        assert client.instances.list(tags={"team": "infra", "run": "ci-2"}) == []

        stats = client.instances.stats(instance_id)
        assert (stats.instance_id, stats.instance_name) == (instance_id, "expiring")
        assert stats.cpu_seconds > 0 and stats.memory_rss_bytes > 0
        assert stats.memory_vms_bytes >= stats.memory_rss_bytes
        assert (stats.allocated_vcpus, stats.allocated_memory_bytes) == (1, 256 * MIB)
        assert stats.memory_utilization_ratio is not None and stats.memory_utilization_ratio > 0
        per_host = httpx.get(fleet.worker.metrics_url).text
        assert f'vmfleet_instance_memory_rss_bytes{{instance_id="{instance_id}"' in per_host
        assert instance_id not in httpx.get(f"{fleet.api.base_url}/metrics").text

        cleared = client.instances.update(instance_id, ttl="0s")
        assert cleared.expires_at is None and cleared.state == "Running"
        with pytest.raises(BadRequestError) as refused:
            client.instances.update(instance_id, restart_policy={"policy": "weekly"})
        assert refused.value.body["code"] == "invalid_restart_policy"  # type: ignore[index]
        assert client.instances.get(instance_id).expires_at is None  # nothing changed

        soon = client.instances.update(instance_id, ttl="6s")
        assert soon.expires_at is not None and soon.state == "Running"
        # SIGKILL the worker at the deadline: it may die before, during or after the
        # delete; the deletion happens once, after it is back.
        time.sleep(max(0.0, (soon.expires_at - datetime.now(UTC)).total_seconds()))
        fleet.worker.kill()
    finally:
        if fleet.worker.proc is not None and fleet.worker.proc.poll() is not None:
            fleet.worker.start()
    assert _gone(client, instance_id), "the expired instance was never deleted"
    events = anyio.run(_state_events, fleet.nats_url, fleet.prefix, instance_id)
    assert [e.deleted for e in events].count(True) == 1, events
    assert not [p for p in fleet.worker.qemu_processes() if _runs(p, instance_id)]


def _runs(pid: int, instance_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return instance_id.encode() in cmdline.read()
    except OSError:
        return False
