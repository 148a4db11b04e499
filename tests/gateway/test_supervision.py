"""Tags, lifetimes and the fields this build does not apply yet, through hypeman's SDK,
without a VM: records are written into the buckets as a worker would, and everything
refused is refused by the gateway before anything is sent.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from hypeman import BadRequestError, ConflictError, Hypeman

from schemas.api import InstanceState
from tests.support.dev import VMFLEET
from tests.support.gateway import Bus, GatewayHandle, host_record, instance_record

pytestmark = pytest.mark.anyio

A = "a" + "1" * 23
B = "a" + "2" * 23
C = "b" + "3" * 23


#: Health checks hypeman refuses, and what the refusal names.
_BAD_HEALTH_CHECKS: list[tuple[object, str]] = [
    ({"type": "grpc"}, "grpc"),
    ({"type": "http"}, "health_check.http"),
    ({"http": {"port": 80}, "tcp": {"port": 80}}, "health_check.type"),
    ({"type": "tcp", "http": {"port": 80}}, "health_check.http"),
    ({"http": {"port": 80, "path": "health"}}, "health_check.http.path"),
    ({"http": {"port": 0}}, "health_check.http.port"),
    ({"http": {"port": 80, "scheme": "ftp"}}, "health_check.http.scheme"),
    ({"tcp": {"port": 80}, "interval": "1s", "timeout": "2s"}, "health_check.timeout"),
    ({"tcp": {"port": 80}, "interval": "often"}, "health_check.interval"),
    ({"tcp": {"port": 80}, "start_period": "-1s"}, "health_check.start_period"),
    ({"tcp": {"port": 80}, "failure_threshold": -1}, "health_check.failure_threshold"),
    ({"tcp": {"port": 80}, "success_threshold": -2}, "health_check.success_threshold"),
    ({"exec": {"command": []}}, "health_check.exec.command"),
    ({"exec": {"command": ["true"], "shell": True}}, "health_check.exec.shell"),
    ({"tcp": {"port": 80}, "retries": 3}, "health_check.retries"),
]


def _sdk(gw: GatewayHandle) -> Hypeman:
    return Hypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)


async def _seed(bus: Bus) -> None:
    s = bus.subjects
    await bus.put(s.hosts_bucket, "h1", host_record("h1", vcpus_allocated=3))
    await bus.put(
        s.instances_bucket, A, instance_record(A, "web", "h1", tags={"team": "a", "env": "ci"})
    )
    await bus.put(
        s.instances_bucket,
        B,
        instance_record(B, "db", "h1", tags={"team": "a"}, state=InstanceState.STOPPED),
    )
    soon = datetime.now(UTC) + timedelta(hours=1)
    await bus.put(
        s.instances_bucket,
        C,
        instance_record(C, "job", "h1", tags={"team": "a", "env": "ci"}, expires_at=soon),
    )


async def _until_listed(gw: GatewayHandle, count: int) -> None:
    async with gw.async_client() as client:
        with anyio.fail_after(10):
            while len((await client.get("/instances")).json()) < count:
                await anyio.sleep(0.02)


async def test_tags_and_expiry_are_shown_and_filtered(gw: GatewayHandle, bus: Bus) -> None:
    await _seed(bus)
    await _until_listed(gw, 3)
    client = _sdk(gw)
    web = client.instances.get(A)
    assert web.tags == {"team": "a", "env": "ci"} and web.expires_at is None
    job = client.instances.get(C)
    assert job.expires_at is not None and job.expires_at > datetime.now(UTC)

    def ids(**params: object) -> list[str]:
        return [i.id for i in client.instances.list(**params)]  # type: ignore[arg-type]

    assert ids(tags={"team": "a"}) == [A, B, C]
    assert ids(tags={"team": "a", "env": "ci"}) == [A, C]
    assert ids(tags={"team": "a", "env": "prod"}) == []
    assert ids(tags={"team": "a"}, state="Stopped") == [B]
    assert ids(tags={"env": "ci"}, state="Running") == [A, C]
    # The SDK percent-encodes the brackets; a hand-written query may not.
    async with gw.async_client() as raw:
        plain = (await raw.get("/instances?tags[env]=ci&tags[team]=a")).json()
    assert [i["id"] for i in plain] == [A, C]


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"tags": {"a]b": "x"}}, "invalid_tags", "a]b"),
        ({"tags": {"a=b": "x"}}, "invalid_tags", "a=b"),
        ({"tags": {f"k{i}": "v" for i in range(1000)}}, "invalid_tags", "at most 50"),
        ({"tags": {"ok": "line\nbreak"}}, "invalid_tags", "ok"),
        ({"ttl": "1h", "expires_at": "2999-01-01T00:00:00Z"}, "invalid_ttl", "expires_at"),
        ({"ttl": "soon"}, "invalid_ttl", "soon"),
        ({"ttl": "-5s"}, "invalid_ttl", "negative"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "invalid_expires_at", "2000-01-01"),
        ({"restart_policy": {"policy": "sometimes"}}, "invalid_restart_policy", "sometimes"),
        ({"restart_policy": {"backoff": "0s"}}, "invalid_restart_policy", "backoff"),
        ({"restart_policy": {"max_attempts": -1}}, "invalid_restart_policy", "max_attempts"),
        ({"restart_policy": {"policy": "always", "wait": "1s"}}, "invalid_restart_policy", "wait"),
        ({"auto_standby": {"enabled": True}}, "invalid_auto_standby", "idle_timeout"),
        *[
            ({"health_check": check}, "invalid_health_check", named)
            for check, named in _BAD_HEALTH_CHECKS
        ],
        (
            {"health_check": {"tcp": {"port": 80}}, "network": {"enabled": False}},
            "invalid_health_check",
            "network.enabled",
        ),
    ],
)
def test_create_refusals(
    shared_gw: GatewayHandle, fields: dict[str, object], code: str, named: str
) -> None:
    client = _sdk(shared_gw)
    with pytest.raises(BadRequestError) as refused:
        client.instances.create(name="refused", image="busybox", **fields)  # type: ignore[arg-type]
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == code, body
    assert named in body["message"]
    assert client.instances.list() == []  # nothing was made


async def test_update_refusals(gw: GatewayHandle, bus: Bus) -> None:
    await _seed(bus)
    past = datetime.now(UTC) - timedelta(seconds=5)
    expired = "c" + "4" * 23
    await bus.put(
        bus.subjects.instances_bucket,
        expired,
        instance_record(expired, "old", "h1", expires_at=past),
    )
    await _until_listed(gw, 4)
    client = _sdk(gw)
    cases: list[tuple[dict[str, object], str, str]] = [
        ({"restart_policy": {"stable_after": "soon"}}, "invalid_restart_policy", "stable_after"),
        ({"health_check": {"type": "exec"}}, "invalid_health_check", "health_check.exec"),
        (
            {"auto_standby": {"enabled": True, "idle_timeout": "soon"}},
            "invalid_auto_standby",
            "soon",
        ),
        ({"env": {"API_KEY": "x"}}, "invalid_env", "env"),
        ({"ttl": "-1m"}, "invalid_ttl", "negative"),
        ({"ttl": "1h", "expires_at": "2999-01-01T00:00:00Z"}, "invalid_ttl", "exclusive"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "invalid_expires_at", "future"),
    ]
    for fields, code, named in cases:
        with pytest.raises(BadRequestError) as refused:
            client.instances.update(A, **fields)  # type: ignore[arg-type]
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == code, (fields, body)
        assert named in body["message"]
    async with gw.async_client() as raw:
        for content in (b"{}", b"", b'{"tags": {"a": "b"}}', b'{"ttl": "1h", "name": "x"}'):
            response = await raw.patch(f"/instances/{A}", content=content)
            assert response.status_code == 400, content
            assert response.json()["code"] == "Bad Request"
        unknown = await raw.patch(f"/instances/{A}", json={"tags": {"a": "b"}})
        assert "tags" in unknown.json()["message"]
    with pytest.raises(ConflictError) as late:
        client.instances.update(expired, ttl="1h")
    assert late.value.body == {  # type: ignore[comparison-overlap]
        "code": "instance_expired",
        "message": f"instance {expired} has expired and is being deleted; it can no longer "
        "be updated",
    }
    info = await bus.js.stream_info(bus.subjects.commands_stream)
    assert info.state.messages == 0  # nothing was sent


async def test_user_mode_checks_need_a_port_mapping(gw: GatewayHandle, bus: Bus) -> None:
    """A user-mode host has no route to its guests: an http/tcp check goes through the
    host port mapped to its guest port, so one without that mapping is refused by name."""
    s = bus.subjects
    await bus.put(s.hosts_bucket, "hu", host_record("hu", network_mode="user"))
    await bus.put(s.instances_bucket, A, instance_record(A, "web", "hu", network_enabled=True))
    await _until_listed(gw, 1)
    client = _sdk(gw)
    check = {"http": {"port": 8080}}
    with pytest.raises(BadRequestError) as refused:
        client.instances.create(
            name="web2",
            image="busybox",
            health_check=check,  # type: ignore[typeddict-item]
            extra_body={"port_mappings": [{"guest_port": 9090, "host_port": 19090}]},
        )
    assert refused.value.body["code"] == "invalid_health_check"  # type: ignore[index]
    assert "health_check.http.port" in refused.value.body["message"]  # type: ignore[index]
    with pytest.raises(BadRequestError) as refused:
        client.instances.update(A, health_check={"tcp": {"port": 22}})
    assert refused.value.body["code"] == "invalid_health_check"  # type: ignore[index]
    assert "health_check.tcp.port" in refused.value.body["message"]  # type: ignore[index]
    assert [i.name for i in client.instances.list()] == ["web"]
    assert client.instances.get(A).health_check is None


async def test_resources_and_capabilities_from_heartbeats(gw: GatewayHandle, bus: Bus) -> None:
    s = bus.subjects
    await bus.put(
        s.hosts_bucket, "h1", host_record("h1", vcpus_allocated=3, memory_allocated_bytes=1 << 30)
    )
    await bus.put(s.hosts_bucket, "h2", host_record("h2", network_mode="bridge"))
    await bus.put(s.instances_bucket, A, instance_record(A, "web", "h1", vcpus=3))
    await _until_listed(gw, 1)
    client = _sdk(gw)
    with anyio.fail_after(10):
        while (
            len((resources := client.resources.get()).allocations) < 1 or resources.cpu.capacity < 4
        ):
            await anyio.sleep(0.05)
    assert resources.cpu.capacity == 4 and resources.cpu.allocated == 3
    assert resources.cpu.effective_limit == 16 and resources.cpu.available == 13
    assert resources.memory.capacity == 16 << 30 and resources.memory.allocated == 1 << 30
    [allocation] = resources.allocations
    assert (allocation.instance_id, allocation.cpu, allocation.memory_bytes) == (A, 3, 1 << 30)
    async with gw.async_client() as raw:
        hosts = (await raw.get("/resources")).json()["hosts"]
    assert [h["host"] for h in hosts] == ["h1", "h2"]
    assert hosts[0]["cpu"]["allocated"] == 3 and hosts[1]["cpu"]["allocated"] == 0

    found = client.capabilities.get()
    assert (found.network.model, found.network.guest_to_guest) == ("bridge", True)
    assert (found.default_runtime.name, found.default_runtime.available) == ("qemu", True)
    assert {r.name: r.available for r in found.runtimes} == {
        "cloud-hypervisor": False,
        "qemu": True,
    }
    assert "instances" in found.features and found.server.api_version


async def test_stats_need_the_owning_host(gw: GatewayHandle, bus: Bus) -> None:
    await bus.put(bus.subjects.instances_bucket, A, instance_record(A, "web", "gone"))
    await _until_listed(gw, 1)
    async with gw.async_client() as raw:
        assert (await raw.get("/instances/nothing/stats")).status_code == 404
        silent = await raw.get(f"/instances/{A}/stats")
    assert (silent.status_code, silent.json()["code"]) == (503, "host_unavailable")


async def test_cli_filters_by_tag_and_updates_the_expiry(gw: GatewayHandle, bus: Bus) -> None:
    await _seed(bus)
    await _until_listed(gw, 3)
    env = {**os.environ, "HYPEMAN_BASE_URL": gw.base_url, "HYPEMAN_API_KEY": gw.token}

    async def vmfleet(*args: str) -> subprocess.CompletedProcess[str]:
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [VMFLEET, *args], env=env, capture_output=True, text=True, check=False
            )
        )

    listed = await vmfleet("ps", "-a", "-q", "--filter", "tag=team=a", "--filter", "tag=env=ci")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == [A, C]
    running = await vmfleet("ps", "-q", "--filter", "tag=team=a")
    assert sorted(running.stdout.split()) == [A, C]
    bad = await vmfleet("ps", "--filter", "team=a")
    assert bad.returncode != 0 and "tag=KEY=VALUE" in bad.stderr
    expired = "c" + "4" * 23
    past = datetime.now(UTC) - timedelta(seconds=5)
    await bus.put(
        bus.subjects.instances_bucket,
        expired,
        instance_record(expired, "old", "h1", expires_at=past),
    )
    await _until_listed(gw, 4)
    late = await vmfleet("update", "--ttl", "1h", expired)
    assert late.returncode != 0 and "expired" in late.stderr
    # What update cannot send is refused before anything reaches the gateway.
    nothing = await vmfleet("update", A)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    alone = await vmfleet("update", "--health-retries", "2", A)
    assert alone.returncode == 2 and "--health-retries need --health-cmd" in alone.stderr
    policy = await vmfleet("update", "--restart", "sometimes", A)
    assert policy.returncode == 2 and "--restart" in policy.stderr
