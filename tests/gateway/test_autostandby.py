"""auto_standby through hypeman's SDK without a VM: bad policies are 400 and change
nothing; the policy is normalized as hypeman echoes it; status and hold travel from the
gateway to the owning host over real NATS and back in hypeman's shape (the host's
controller runs over an engine stand-in)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest
from hypeman import AsyncHypeman, BadRequestError, ConflictError, Hypeman

from gateway.supervision import auto_standby_policy
from schemas.api import InstanceState
from schemas.autostandby import AutoStandbySpec
from tests.support.gateway import Bus, GatewayHandle, host_record
from tests.worker.autostandby.double import EngineDouble, record
from worker.autostandby.controller import AutoStandbyController
from worker.autostandby.registry import InboundRegistry
from worker.autostandby.service import serve_autostandby

pytestmark = pytest.mark.anyio

A = "a" + "5" * 23
SLEEPING = "a" + "6" * 23
POLICY = AutoStandbySpec(enabled=True, idle_timeout="5m0s", idle_timeout_s=300.0)

BAD_POLICIES: list[tuple[object, str]] = [
    ({"enabled": True}, "idle_timeout is required"),
    ({"enabled": True, "idle_timeout": "0s"}, "positive"),
    ({"enabled": True, "idle_timeout": "-1m"}, "positive"),
    ({"enabled": True, "idle_timeout": "soon"}, "soon"),
    ({"enabled": True, "idle_timeout": "30"}, "'30'"),
    ({"enabled": True, "idle_timeout": "5m", "ignore_source_cidrs": ["10.0.0.1"]}, "10.0.0.1"),
    ({"enabled": True, "idle_timeout": "5m", "ignore_source_cidrs": ["10.0.0.0/33"]}, "/33"),
    ({"enabled": True, "idle_timeout": "5m", "ignore_destination_ports": [0]}, "0 is not"),
    ({"enabled": True, "idle_timeout": "5m", "ignore_destination_ports": [70000]}, "70000"),
    ({"enabled": "yes", "idle_timeout": "5m"}, "enabled"),
    ({"enabled": True, "idle_timeout": "5m", "wake": True}, "wake"),
]


def _sdk(gw: GatewayHandle) -> Hypeman:
    return Hypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)


@pytest.mark.parametrize(("policy", "named"), BAD_POLICIES)
def test_bad_policy_on_create_is_400(shared_gw: GatewayHandle, policy: object, named: str) -> None:
    client = _sdk(shared_gw)
    with pytest.raises(BadRequestError) as refused:
        client.instances.create(name="idle", image="busybox", auto_standby=policy)  # type: ignore[arg-type]
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_auto_standby", body
    assert named in body["message"]
    assert client.instances.list() == []


@pytest.fixture
async def host(gw: GatewayHandle, bus: Bus) -> AsyncIterator[EngineDouble]:
    """Host h1, live, owning two instances; its controller answers over NATS."""
    engine = EngineDouble()
    engine.add(record(A, auto_standby=POLICY))
    engine.add(record(SLEEPING, auto_standby=POLICY, state=InstanceState.STANDBY))
    s = bus.subjects
    await bus.put(s.hosts_bucket, "h1", host_record("h1"))
    for r in engine.records():
        await bus.put(s.instances_bucket, r.id, r)
    controller = AutoStandbyController(engine.as_engine(), InboundRegistry(), bridge=False)
    async with anyio.create_task_group() as tg:
        await tg.start(serve_autostandby, bus.nc, s, "h1", controller)
        async with gw.async_client() as raw:
            with anyio.fail_after(10):
                while len((await raw.get("/instances")).json()) < 2:
                    await anyio.sleep(0.02)
        yield engine
        tg.cancel_scope.cancel()


async def test_bad_policy_on_patch_is_400_and_changes_nothing(
    gw: GatewayHandle, host: EngineDouble
) -> None:
    client = AsyncHypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)
    for policy, named in BAD_POLICIES:
        with pytest.raises(BadRequestError) as refused:
            await client.instances.update(A, auto_standby=policy)  # type: ignore[arg-type]
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == "invalid_auto_standby", body
        assert named in body["message"]
    shown = await client.instances.get(A)
    assert shown.auto_standby is not None and shown.auto_standby.idle_timeout == "5m0s"
    assert host.executed == []


async def test_status_and_hold_through_the_gateway(gw: GatewayHandle, host: EngineDouble) -> None:
    client = AsyncHypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)
    status = await client.instances.auto_standby.status(A)
    assert (status.status, status.reason) == ("idle_countdown", "idle_timeout_not_elapsed")
    assert status.supported and status.configured and status.enabled and status.eligible
    assert status.idle_timeout == "5m0s" and status.active_inbound_connections == 0
    assert status.tracking_mode == "host_port_sockets_tcp"
    before = datetime.now(UTC)
    held = await client.instances.auto_standby.hold(A)
    assert held.hold_until is not None
    assert held.hold_until >= before + timedelta(minutes=5) - timedelta(seconds=1)
    assert host.get(A).idle.hold_until == held.hold_until
    with pytest.raises(ConflictError) as refused:
        await client.instances.auto_standby.hold(SLEEPING)
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "instance_in_standby", body
    sleeping = await client.instances.auto_standby.status(SLEEPING)
    assert (sleeping.status, sleeping.reason) == ("ineligible", "instance_not_running")


def test_policy_is_normalized_as_hypeman_echoes_it() -> None:
    policy = auto_standby_policy(
        {
            "enabled": True,
            "idle_timeout": "90s",
            "ignore_source_cidrs": ["192.168.7.9/16", "10.1.2.3/8", "10.0.0.0/8"],
            "ignore_destination_ports": [9000, 22, 9000],
        }
    )
    assert policy is not None
    assert msgspec.json.decode(msgspec.json.encode(policy.to_api())) == {
        "enabled": True,
        "idle_timeout": "1m30s",
        "ignore_destination_ports": [22, 9000],
        "ignore_source_cidrs": ["10.0.0.0/8", "192.168.0.0/16"],
    }
    disabled = auto_standby_policy({"enabled": False, "idle_timeout": "5m"})
    assert disabled is not None and msgspec.json.encode(disabled.to_api()) == b'{"enabled":false}'
    assert auto_standby_policy(None) is None
