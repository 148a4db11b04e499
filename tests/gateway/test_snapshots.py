"""Snapshot, fork and schedule requests refused by the gateway with no VM at all: bad bodies
and filters are 400, what is missing is 404, a fork from a state that cannot be forked or a
Running instance without ``from_running`` is 409, a fork under a taken name is 400
``name_conflict``; each before any command is sent (the records are put straight into the
fleet's buckets, and no host exists to take a command). The schedule reads back from the
record its worker would write."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from schemas.api import InstanceState
from schemas.snapshots import (
    FileIdentity,
    ScheduleState,
    SnapshotKind,
    SnapshotRecord,
    SnapshotSource,
)
from tests.support.gateway import Bus, GatewayHandle, instance_record

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)


def snapshot_record(
    snapshot_id: str, *, name: str | None = None, **fields: object
) -> SnapshotRecord:
    values: dict[str, object] = {
        "id": snapshot_id,
        "name": name,
        "kind": SnapshotKind.STANDBY,
        "created_at": NOW,
        "host": "h1",
        "hosts": ("h1",),
        "source": SnapshotSource(
            id="i-1",
            name="web",
            image="docker.io/library/busybox:latest",
            image_digest="",
            size_bytes=1 << 30,
            overlay_bytes=1 << 30,
            vcpus=1,
            state=InstanceState.RUNNING,
        ),
        "hypervisor": "qemu",
        "vmm_version": "QEMU emulator version 7.2.22",
        "kernel": FileIdentity(path="/k", sha256="s"),
        "initrd": FileIdentity(path="/i", sha256="s"),
        "memory_bytes": 1 << 30,
        "vcpus": 1,
        **fields,
    }
    return SnapshotRecord(**values)  # type: ignore[arg-type]


async def _fleet(bus: Bus) -> None:
    s = bus.subjects
    await bus.put(s.instances_bucket, "i-1", instance_record("i-1", "web", "h1"))
    await bus.put(
        s.instances_bucket,
        "i-2",
        instance_record("i-2", "paused", "h1", state=InstanceState.PAUSED),
    )
    await bus.put(s.snapshots_bucket, "s-1", snapshot_record("s-1", name="warm", tags={"a": "1"}))
    await bus.put(
        s.snapshots_bucket,
        "s-2",
        snapshot_record("s-2", kind=SnapshotKind.STOPPED, created_at=NOW + timedelta(seconds=1)),
    )


def _wait_for(gw: GatewayHandle, path: str) -> None:
    with gw.client() as client:
        for _ in range(100):
            if client.get(path).status_code == 200:
                return
            time.sleep(0.05)
    raise AssertionError(f"{path} never showed up")


async def test_snapshots_are_listed_filtered_and_read(gw: GatewayHandle, bus: Bus) -> None:
    await _fleet(bus)
    with gw.client() as client:
        assert [s["id"] for s in client.get("/snapshots").json()] == ["s-1", "s-2"]
        assert [s["id"] for s in client.get("/snapshots?kind=Stopped").json()] == ["s-2"]
        assert [s["id"] for s in client.get("/snapshots?name=warm").json()] == ["s-1"]
        assert [s["id"] for s in client.get("/snapshots", params={"tags[a]": "1"}).json()] == [
            "s-1"
        ]
        assert client.get("/snapshots?source_instance_id=nope").json() == []
        one = client.get("/snapshots/s-1").json()
        assert (one["kind"], one["source_instance_id"], one["source_hypervisor"]) == (
            "Standby",
            "i-1",
            "qemu",
        )
        bad = client.get("/snapshots?kind=Paused")
        assert bad.status_code == 400 and "kind" in bad.json()["message"]
        missing = client.get("/snapshots/nope")
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"


#: (method, path, body, status): each refused before any command is sent.
CASES = [
    ("post", "/instances/i-1/snapshots", {"kind": "Paused"}, 400),
    ("post", "/instances/i-1/snapshots", {}, 400),
    ("post", "/instances/i-1/snapshots", {"kind": "Standby", "surprise": 1}, 400),
    ("post", "/instances/nope/snapshots", {"kind": "Standby"}, 404),
    # Compression is refused, never ignored: vmfleet's saved memory stays uncompressed.
    (
        "post",
        "/instances/i-1/snapshots",
        {"kind": "Standby", "compression": {"enabled": True}},
        400,
    ),
    ("post", "/instances/i-1/standby", {"compression": {"enabled": True}}, 400),
    ("post", "/instances/i-1/standby", {"compression_delay": "soon"}, 400),
    ("post", "/instances/i-1/standby", {"surprise": 1}, 400),
    ("post", "/snapshots/s-1/fork", {}, 400),
    ("post", "/snapshots/s-1/fork", {"name": "Not_A_Name"}, 400),
    ("post", "/snapshots/s-1/fork", {"name": "ok", "target_state": "Paused"}, 400),
    ("post", "/snapshots/s-1/fork", {"name": "ok", "target_hypervisor": "firecracker"}, 400),
    ("post", "/snapshots/nope/fork", {"name": "ok"}, 404),
    ("post", "/instances/i-1/fork", {"name": "ok"}, 409),  # Running, no from_running
    ("post", "/instances/i-2/fork", {"name": "ok", "from_running": True}, 409),  # Paused
    ("post", "/instances/nope/fork", {"name": "ok"}, 404),
    ("post", "/instances/i-1/snapshots/nope/restore", {}, 404),
    ("delete", "/snapshots/nope", None, 404),
    ("get", "/instances/i-1/snapshot-schedule", None, 404),
    ("delete", "/instances/i-1/snapshot-schedule", None, 404),
    (
        "put",
        "/instances/i-1/snapshot-schedule",
        {"interval": "30s", "retention": {"max_count": 1}},
        400,
    ),
    ("put", "/instances/i-1/snapshot-schedule", {"interval": "1h", "retention": {}}, 400),
    (
        "put",
        "/instances/i-1/snapshot-schedule",
        {"interval": "1h", "retention": {"max_count": 0}},
        400,
    ),
    (
        "put",
        "/instances/i-1/snapshot-schedule",
        {"interval": "soon", "retention": {"max_count": 1}},
        400,
    ),
    (
        "put",
        "/instances/i-1/snapshot-schedule",
        {"interval": "1h", "retention": {"max_age": "old"}},
        400,
    ),
    (
        "put",
        "/instances/i-1/snapshot-schedule",
        {"interval": "1h", "retention": {"max_count": 1}, "name_prefix": "p" * 48},
        400,
    ),
    (
        "put",
        "/instances/nope/snapshot-schedule",
        {"interval": "1h", "retention": {"max_count": 1}},
        404,
    ),
]


async def test_bad_requests_are_refused_before_any_command(gw: GatewayHandle, bus: Bus) -> None:
    await _fleet(bus)
    _wait_for(gw, "/instances/i-2")
    with gw.client() as client:
        for method, path, body, status in CASES:
            response = client.request(method.upper(), path, json=body)
            assert response.status_code == status, (method, path, body, response.text)
            assert set(response.json()) >= {"code", "message"}


async def test_a_fork_under_a_taken_name_is_name_conflict(gw: GatewayHandle, bus: Bus) -> None:
    await _fleet(bus)
    _wait_for(gw, "/instances/i-1")
    with gw.client() as client:
        response = client.post("/snapshots/s-1/fork", json={"name": "web"})
    assert response.status_code == 400
    assert response.json()["code"] == "name_conflict"


async def test_a_schedule_reads_back_from_the_record(gw: GatewayHandle, bus: Bus) -> None:
    schedule = ScheduleState(
        interval_s=3600,
        max_count=3,
        max_age_s=86400,
        metadata={"k": "v"},
        name_prefix="nightly",
        created_at=NOW,
        updated_at=NOW,
        next_run_at=NOW + timedelta(hours=1),
        last_snapshot_id="s-1",
    )
    record = instance_record("i-3", "sched", "h1", snapshot_schedule=schedule)
    await bus.put(bus.subjects.instances_bucket, "i-3", record)
    _wait_for(gw, "/instances/i-3")
    with gw.client() as client:
        got = client.get("/instances/i-3/snapshot-schedule").json()
    assert got["interval"] == "1h0m0s"
    assert got["retention"] == {"max_count": 3, "max_age": "24h0m0s"}
    assert (got["name_prefix"], got["metadata"], got["last_snapshot_id"]) == (
        "nightly",
        {"k": "v"},
        "s-1",
    )
