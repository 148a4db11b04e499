"""Snapshots and forks through hypeman's SDK on the test fleet, with three real guests: a
parent that counts and prints random bytes, and two forks of it (one of a named snapshot,
one of the instance itself).

What a user sees: the parent keeps running through its snapshot; each fork goes on counting
from the snapshot's value with its own MAC and hostname, and the first random bytes each
reads after its resume differ; the snapshot is listed and filtered, refused under a taken
name, deleted without harm to the forks; a restore in place takes the parent's counter back.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Any

import pytest
from hypeman import ConflictError, Hypeman, NotFoundError
from hypeman.types import Instance

from tests.gateway.conftest import Fleet
from tests.support.sdk import sdk_client, wait_for_instance

pytestmark = pytest.mark.vm

# Each tick: the count, 8 bytes read from /dev/urandom then, and the hostname.
COUNTER = (
    "i=0; while true; do i=$((i+1)); "
    'echo "tick $i $(head -c8 /dev/urandom | od -An -tx1 | tr -d " \\n") $(hostname)"; '
    "sleep 0.3; done"
)
TICK = re.compile(r"tick (\d+) ([0-9a-f]{16}) (\S+)")


def ticks(client: Hypeman, instance_id: str) -> list[tuple[int, str, str]]:
    lines = client.instances.logs(instance_id, tail=2000)
    found = (TICK.search(line) for line in lines)
    return [(int(m[1]), m[2], m[3]) for m in found if m]


def wait_for_ticks(
    client: Hypeman, instance_id: str, done: object, timeout_s: float = 90
) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = ticks(client, instance_id)
        if done(seen):  # type: ignore[operator]
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached; last ticks {seen[-5:]}")
        time.sleep(0.3)


def _went_back(seen: list[tuple[int, str, str]]) -> int | None:
    """The count the log went back to, if it did."""
    numbers = [n for n, _, _ in seen]
    return next((b for a, b in itertools.pairwise(numbers) if b < a - 1), None)


def running(instance: Instance) -> bool:
    return instance.state == "Running"


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Hypeman:
    return sdk_client(fleet)


def fork_events(fleet: Fleet, instance_id: str) -> list[dict[str, Any]]:
    """The fork events of an instance, replayed from the start of ``/events``, up to its
    end (finished or failed)."""
    found: list[dict[str, Any]] = []
    with (
        fleet.api.client() as api,
        api.stream(
            "GET", "/events", params={"instance": instance_id}, headers={"Last-Event-ID": "0"}
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data:") and (event := json.loads(line[5:]))["kind"] == "fork":
                found.append(event)
                if event["action"] != "started":
                    return found
    raise AssertionError(f"the events stream ended after {found}")


def test_snapshot_forks_diverge_and_restore(
    fleet: Fleet, client: Hypeman, busybox_image: str
) -> None:
    parent = client.instances.create(
        name="snap-parent", image=busybox_image, size="256MB", vcpus=1, cmd=["sh", "-c", COUNTER]
    )
    made = [parent.id]
    try:
        wait_for_instance(client, parent.id, running)
        before = wait_for_ticks(client, parent.id, lambda t: len(t) >= 3)[-1][0]

        snap = client.instances.snapshots.create(
            parent.id, kind="Standby", name="warm", tags={"suite": "snapshots"}
        )
        assert (snap.kind, snap.source_instance_id, snap.name) == ("Standby", parent.id, "warm")
        assert snap.size_bytes > 0
        assert client.instances.get(parent.id).state == "Running"

        # Listed, filtered, and its name taken among the parent's snapshots.
        assert [s.id for s in client.snapshots.list(source_instance_id=parent.id)] == [snap.id]
        assert [s.id for s in client.snapshots.list(tags={"suite": "snapshots"})] == [snap.id]
        assert client.snapshots.list(kind="Stopped", source_instance_id=parent.id) == []
        with pytest.raises(ConflictError):
            client.instances.snapshots.create(parent.id, kind="Standby", name="warm")
        with pytest.raises(ConflictError):  # Running without from_running
            client.instances.fork(parent.id, name="fork-refused")

        fork_a = client.snapshots.fork(snap.id, name="fork-a")
        made.append(fork_a.id)
        fork_b = client.instances.fork(parent.id, name="fork-b", from_running=True)
        made.append(fork_b.id)
        assert (fork_a.state, fork_b.state) == ("Running", "Running")
        events = fork_events(fleet, fork_a.id)
        assert [(e["action"], e["snapshot_id"], e["source_instance_id"]) for e in events] == [
            ("started", snap.id, parent.id),
            ("finished", snap.id, parent.id),
        ]
        assert len({parent.network.mac, fork_a.network.mac, fork_b.network.mac}) == 3
        # The name is taken: refused, and nothing of a third fork is left.
        with pytest.raises(Exception) as refused:
            client.snapshots.fork(snap.id, name="fork-a")
        assert "name_conflict" in str(refused.value) or "already" in str(refused.value)
        assert sorted(i.name for i in client.instances.list()) == sorted(
            ["snap-parent", "fork-a", "fork-b"]
        )

        # Each fork: the parent's counter went on (never from 1), under its own hostname,
        # and the first random bytes read as that host differ between the two forks.
        firsts = []
        for fork in (fork_a, fork_b):
            seen = wait_for_ticks(
                client, fork.id, lambda t, f=fork: any(h == f.name for *_, h in t)
            )
            assert seen[0][0] >= before
            firsts.append(next(t for t in seen if t[2] == fork.name))
        assert firsts[0][1] != firsts[1][1]

        # Deleting the snapshot leaves its forks running.
        client.snapshots.delete(snap.id)
        with pytest.raises(NotFoundError):
            client.snapshots.get(snap.id)
        assert client.instances.get(fork_a.id).state == "Running"
        count_a = ticks(client, fork_a.id)[-1][0]
        wait_for_ticks(client, fork_a.id, lambda t: t[-1][0] > count_a + 2)

        # A schedule on the parent: set, read back, removed (its worker runs it).
        schedule = client.instances.snapshot_schedule.update(
            parent.id, interval="1h", retention={"max_count": 2}, name_prefix="hourly"
        )
        assert (schedule.interval, schedule.retention.max_count) == ("1h0m0s", 2)
        assert client.instances.snapshot_schedule.get(parent.id).name_prefix == "hourly"
        client.instances.snapshot_schedule.delete(parent.id)
        with pytest.raises(NotFoundError):
            client.instances.snapshot_schedule.get(parent.id)

        # Restore in place: the parent's counter goes back to the snapshot's value.
        back = client.instances.snapshots.create(parent.id, kind="Standby", name="back")
        at_back = ticks(client, parent.id)[-1][0]
        wait_for_ticks(client, parent.id, lambda t: t[-1][0] > at_back + 5)
        restored = client.instances.snapshots.restore(back.id, id=parent.id)
        assert restored.state == "Running" and restored.id == parent.id
        assert [s.id for s in client.snapshots.list(source_instance_id=parent.id)] == [back.id]
        # The count went back once, to the snapshot's value, and went on from there.
        seen = wait_for_ticks(client, parent.id, lambda t: _went_back(t) is not None)
        assert at_back - 1 <= (_went_back(seen) or 0) <= at_back + 2
    finally:
        for instance_id in reversed(made):
            client.instances.delete(instance_id)
        for snapshot in client.snapshots.list(source_instance_id=parent.id):
            client.snapshots.delete(snapshot.id)
