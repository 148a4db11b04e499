"""Auto-standby through hypeman's SDK on one real guest: a busybox httpd behind two mapped
ports (the fleet's worker networks in user mode). A TCP connection held open keeps the
instance Running and is counted; once it closes, the instance goes to Standby after its
idle_timeout; a connection to an ignored port does not keep it awake; a hold postpones
the standby; a hold on a sleeping instance is 409. Each test sets the timeout it needs
with a PATCH (the create's is an hour) and leaves the instance Running."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hypeman import ConflictError, Hypeman
from hypeman.types import AutoStandbyStatus
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded_nats import free_port
from tests.gateway.conftest import Fleet
from tests.support.sdk import sdk_client, wait_for_instance

pytestmark = pytest.mark.vm

#: Two web servers, on 8080 (counted) and 8081 (ignored by the policy).
SERVE = (
    "mkdir -p /www && echo ok > /www/index.html && httpd -p 8080 -h /www && "
    "httpd -p 8081 -h /www && exec sleep 1000000"
)


@dataclass(frozen=True)
class Guest:
    client: Hypeman
    id: str
    web_port: int
    ignored_port: int


@pytest.fixture(scope="module")
def guest(fleet: Fleet, busybox_image: str) -> Iterator[Guest]:
    client = sdk_client(fleet)
    web, ignored = free_port(), free_port()
    created = client.instances.create(
        name="idle-web",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["sh", "-c", SERVE],
        auto_standby={
            "enabled": True,
            "idle_timeout": "1h",
            "ignore_destination_ports": [8081, 8081],
        },
        extra_body={
            "port_mappings": [
                {"guest_port": 8080, "host_port": web},
                {"guest_port": 8081, "host_port": ignored},
            ]
        },
    )
    try:
        assert created.auto_standby is not None
        assert created.auto_standby.idle_timeout == "1h0m0s"
        assert created.auto_standby.ignore_destination_ports == [8081]
        wait_for_instance(client, created.id, lambda i: i.state == "Running")
        _until(lambda: _get(web).status_code == 200)
        yield Guest(client, created.id, web, ignored)
    finally:
        client.instances.delete(created.id)


def test_held_connection_keeps_it_running_then_idle_standby(guest: Guest, fleet: Fleet) -> None:
    client = guest.client
    with socket.create_connection(("127.0.0.1", guest.web_port)):
        client.instances.update(guest.id, auto_standby=_policy("2s"))
        active = _until_status(guest, lambda s: s.active_inbound_connections >= 1)
        assert (active.status, active.reason) == ("active", "active_inbound_connections")
        assert active.eligible and active.enabled and active.configured and active.supported
        assert active.idle_timeout == "2s"
        # Well past the timeout, the open (silent) connection still keeps it awake.
        time.sleep(6)
        status = client.instances.auto_standby.status(guest.id)
        assert status.status == "active" and status.active_inbound_connections == 1
        assert status.last_inbound_activity_at is not None
        assert client.instances.get(guest.id).state == "Running"
    # Closed: the clock runs, and the policy puts the instance to sleep.
    wait_for_instance(client, guest.id, lambda i: i.state == "Standby", timeout_s=120)
    assert _standby_by_cause(fleet)["idle"] >= 1
    status = client.instances.auto_standby.status(guest.id)
    assert (status.status, status.reason) == ("ineligible", "instance_not_running")
    # A hold cannot keep awake what sleeps already.
    with pytest.raises(ConflictError) as refused:
        client.instances.auto_standby.hold(guest.id)
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "instance_in_standby", body
    _wake(guest)
    # The events say why: the policy put it to sleep, a user's restore woke it.
    standby, wake = _standby_and_wake_events(fleet, guest.id)
    assert (standby["previous"], standby["cause"]) == ("Paused", "idle")
    assert (wake["state"], wake["cause"]) == ("Running", "api")


def test_ignored_port_does_not_keep_it_awake(guest: Guest) -> None:
    client = guest.client
    with socket.create_connection(("127.0.0.1", guest.ignored_port)):
        client.instances.update(guest.id, auto_standby=_policy("3s", ignore=[8081]))
        # The ignored connection never counts (a request of the last test may still be
        # closing for a moment).
        _until_status(guest, lambda s: s.active_inbound_connections == 0)
        wait_for_instance(client, guest.id, lambda i: i.state == "Standby", timeout_s=120)
    _wake(guest)


def test_hold_postpones_standby(guest: Guest) -> None:
    client = guest.client
    client.instances.update(guest.id, auto_standby=_policy("30s"))
    idle = _until_status(guest, lambda s: s.idle_since is not None)
    assert idle.status == "idle_countdown" and idle.countdown_remaining is not None
    assert idle.idle_since is not None and idle.next_standby_at is not None
    held = client.instances.auto_standby.hold(guest.id)
    assert held.hold_until is not None and held.next_standby_at == held.hold_until
    assert held.hold_until > idle.idle_since + timedelta(seconds=30)
    newer = client.instances.auto_standby.hold(guest.id)
    assert newer.hold_until is not None and newer.hold_until >= held.hold_until
    client.instances.update(guest.id, auto_standby=_policy("1h"))
    assert client.instances.get(guest.id).state == "Running"


# -- helpers --------------------------------------------------------------------------------


def _policy(timeout: str, ignore: list[int] | None = None) -> dict[str, object]:
    return {"enabled": True, "idle_timeout": timeout, "ignore_destination_ports": ignore or [8081]}


def _wake(guest: Guest) -> None:
    """Back to Running (by the API) with an hour's timeout, serving again."""
    guest.client.instances.update(guest.id, auto_standby=_policy("1h"))
    current = guest.client.instances.get(guest.id)
    if current.state == "Standby":
        guest.client.instances.restore(guest.id)
    wait_for_instance(guest.client, guest.id, lambda i: i.state == "Running")
    _until(lambda: _get(guest.web_port).status_code == 200)


def _until_status(
    guest: Guest, done: Callable[[AutoStandbyStatus], bool], timeout_s: float = 60
) -> AutoStandbyStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = guest.client.instances.auto_standby.status(guest.id)
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {status}")
        time.sleep(0.3)


def _until(done: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if done():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        time.sleep(0.3)


def _get(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/", timeout=5)


def _standby_and_wake_events(fleet: Fleet, instance_id: str) -> tuple[dict[str, Any], ...]:
    """The instance's first step into Standby and the Paused -> Running after it, from
    ``/events`` replayed from the start of the stream."""
    standby: dict[str, Any] | None = None
    with (
        fleet.api.client() as client,
        client.stream(
            "GET", "/events", params={"instance": instance_id}, headers={"Last-Event-ID": "0"}
        ) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if standby is None and event["state"] == "Standby":
                standby = event
            elif standby is not None and event["previous"] == "Paused":
                return standby, event
    raise AssertionError("the events stream ended")


def _standby_by_cause(fleet: Fleet) -> dict[str, float]:
    text = httpx.get(fleet.worker.metrics_url, timeout=10).text
    return {
        sample.labels["cause"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vmfleet_worker_instances_standby"
        for sample in family.samples
    }
