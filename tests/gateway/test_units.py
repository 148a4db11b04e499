"""The gateway's pure parts: ids, Go's JSON string encoding, durations, placement, error
translation (no NATS, no server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import nats.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import EXCEPTION_HANDLERS, StrayCancellation
from gateway.ids import derived_id, new_id
from gateway.placement import Demand, Placement
from gateway.requests import parse_duration
from gateway.sse import go_json_string
from schemas.api import Hypervisor
from schemas.errors import Conflict, HostUnavailable, NoCapacity
from schemas.messages import HostRecord
from tests.support.gateway import host_record

GIB = 1 << 30
ID = re.compile(r"^[a-z][0-9a-z]{23}$")


def test_ids_have_hypemans_shape() -> None:
    assert all(ID.match(new_id()) for _ in range(200))
    assert derived_id("instance", "k") == derived_id("instance", "k")
    assert derived_id("instance", "k") != derived_id("instance", "l")
    assert ID.match(derived_id("instance", "k"))


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("plain", '"plain"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("<b>&</b>", '"\\u003cb\\u003e\\u0026\\u003c/b\\u003e"'),
        ("\n\r\t\b\f\x00\x1f\x7f", '"\\n\\r\\t\\b\\f\\u0000\\u001f\x7f"'),
        ("\u2028\u2029", '"\\u2028\\u2029"'),
        ("é😀\ufffd", '"é😀\ufffd"'),
    ],
)
def test_strings_are_encoded_as_gos_json_marshal(text: str, encoded: str) -> None:
    assert go_json_string(text) == encoded.encode()


@given(st.text())
def test_encoded_strings_decode_back(text: str) -> None:
    encoded = go_json_string(text)
    assert json.loads(encoded) == text
    assert b"\n" not in encoded and b"<" not in encoded


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("2m", 120), ("1m30s", 90), ("500ms", 0.5), ("1.5h", 5400), ("45", 45)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1x", "-1s", "1 s", "1s2", ".s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@dataclass
class _View:
    hosts: list[HostRecord] = field(default_factory=list)
    drains: dict[str, object] = field(default_factory=dict)

    def live_hosts(self) -> list[HostRecord]:
        return self.hosts


def _placement(*hosts: HostRecord) -> Placement:
    return Placement(_View(list(hosts)))  # type: ignore[arg-type]


SMALL = Demand(vcpus=1, memory_bytes=1 * GIB, hypervisor=Hypervisor.QEMU)


def test_most_free_memory_that_fits_wins() -> None:
    roomy = host_record("roomy", memory_total_bytes=16 * GIB, memory_allocated_bytes=4 * GIB)
    tight = host_record("tight", memory_total_bytes=16 * GIB, memory_allocated_bytes=15 * GIB)
    busy = host_record("busy", memory_total_bytes=64 * GIB, vcpus_total=1, vcpus_allocated=4)
    chp = host_record("chp", memory_total_bytes=64 * GIB, hypervisors=[Hypervisor.CLOUD_HYPERVISOR])
    assert _placement(roomy, tight, busy, chp).instance_host(SMALL) == "roomy"
    with pytest.raises(NoCapacity):
        _placement(tight).instance_host(Demand(1, 2 * GIB, Hypervisor.QEMU))


def test_a_request_naming_no_hypervisor_fits_any_host() -> None:
    qemu = host_record("qemu", memory_total_bytes=16 * GIB)
    chp = host_record("chp", memory_total_bytes=64 * GIB, hypervisors=[Hypervisor.CLOUD_HYPERVISOR])
    assert _placement(qemu, chp).instance_host(Demand(1, GIB, None)) == "chp"
    assert _placement(qemu, chp).instance_host(Demand(1, GIB, Hypervisor.QEMU)) == "qemu"
    with pytest.raises(NoCapacity, match="under qemu"):
        _placement(chp).instance_host(Demand(1, GIB, Hypervisor.QEMU))


def test_pinned_host_must_be_live_and_fit() -> None:
    a, b = host_record("a"), host_record("b", memory_total_bytes=64 * GIB)
    assert _placement(a, b).instance_host(SMALL, pinned_to="a") == "a"
    with pytest.raises(HostUnavailable):
        _placement(b).instance_host(SMALL, pinned_to="a")


def test_labels_constrain_placement() -> None:
    gpu = host_record("gpu", labels={"zone": "a", "kind": "gpu"})
    plain = host_record("plain", labels={"zone": "a"}, memory_total_bytes=64 * GIB)
    placement = _placement(gpu, plain)
    assert placement.instance_host(SMALL, labels={"kind": "gpu"}) == "gpu"
    assert placement.instance_host(SMALL, labels={"zone": "a"}) == "plain"  # most free memory
    with pytest.raises(NoCapacity, match="kind=tpu"):
        placement.instance_host(SMALL, labels={"kind": "tpu"})


def test_drained_hosts_get_nothing_new() -> None:
    a, b = host_record("a"), host_record("b", memory_total_bytes=64 * GIB)
    placement = _placement(a, b)
    placement.view.drains = {"b": object()}  # type: ignore[attr-defined]
    assert placement.instance_host(SMALL) == "a"
    assert placement.volume_host() == "a"
    with pytest.raises(NoCapacity, match="drained"):
        placement.instance_host(SMALL, pinned_to="b")


def test_reservations_count_until_a_later_heartbeat() -> None:
    host = host_record("h", memory_total_bytes=2 * GIB)
    placement = _placement(host)
    # 1 GiB placed, 1 GiB left: 1.5 GiB does not fit
    with placement.reserved("h", SMALL), pytest.raises(NoCapacity):
        placement.instance_host(Demand(1, GIB + GIB // 2, Hypervisor.QEMU))
    assert placement.instance_host(SMALL) == "h"  # still reserved: 1 GiB fits exactly
    with pytest.raises(NoCapacity):
        placement.instance_host(Demand(1, 2 * GIB, Hypervisor.QEMU))
    later = datetime.now(UTC) + timedelta(seconds=1)
    placement.view.hosts = [host_record("h", memory_total_bytes=2 * GIB, heartbeat_at=later)]  # type: ignore[attr-defined]
    assert placement.instance_host(Demand(1, 2 * GIB, Hypervisor.QEMU)) == "h"


def test_volumes_go_to_the_most_free_disk() -> None:
    a = host_record("a", disk_free_bytes=10 * GIB)
    b = host_record("b", disk_free_bytes=20 * GIB)
    assert _placement(a, b).volume_host() == "b"
    promised = host_record("b", disk_free_bytes=20 * GIB, disk_promised_bytes=15 * GIB)
    assert _placement(a, promised).volume_host() == "a"  # b's sparse disks may take 15 GiB
    with pytest.raises(NoCapacity):
        _placement().volume_host()


def test_disk_counts_what_the_sparse_disks_may_still_take() -> None:
    big = Demand(1, GIB, Hypervisor.QEMU, disk_bytes=10 * GIB)
    promised = host_record("promised", disk_free_bytes=20 * GIB, disk_promised_bytes=15 * GIB)
    small = host_record("small", disk_free_bytes=10 * GIB, memory_total_bytes=2 * GIB)
    assert _placement(promised, small).instance_host(big) == "small"  # 10 GiB fit exactly
    with pytest.raises(NoCapacity, match="10240 MiB of disk"):
        _placement(promised).instance_host(big)
    placement = _placement(small)
    with placement.reserved("small", big), pytest.raises(NoCapacity):
        placement.instance_host(Demand(1, GIB, Hypervisor.QEMU, disk_bytes=1))


def test_overcommit_ratios_scale_the_hosts_totals() -> None:
    host = host_record(
        "h", vcpus_total=2, memory_total_bytes=8 * GIB, memory_allocated_bytes=8 * GIB
    )
    with pytest.raises(NoCapacity):
        _placement(host).instance_host(SMALL)  # memory is not overcommitted by default
    doubled = Placement(_View([host]), memory_overcommit=2.0)  # type: ignore[arg-type]
    assert doubled.instance_host(SMALL) == "h"
    one_cpu = Placement(_View([host]), cpu_overcommit=0.5, memory_overcommit=2.0)  # type: ignore[arg-type]
    assert one_cpu.instance_host(SMALL) == "h"
    with pytest.raises(NoCapacity):
        one_cpu.instance_host(Demand(2, GIB, Hypervisor.QEMU))


def test_a_host_with_the_image_ready_is_preferred() -> None:
    image = frozenset({"reg/app:1", "sha256:" + "cd" * 32})
    roomy = host_record("roomy", memory_total_bytes=64 * GIB)
    warm = host_record("warm", images=["sha256:" + "cd" * 32])
    full = host_record("full", images=["reg/app:1"], memory_allocated_bytes=8 * GIB)
    placement = _placement(roomy, warm, full)
    assert placement.instance_host(SMALL, images=image) == "warm"  # has it, and fits
    assert placement.instance_host(SMALL, images=frozenset({"reg/other:1"})) == "roomy"
    assert placement.instance_host(SMALL) == "roomy"  # nobody has it: most free memory
    assert _placement(roomy, full).instance_host(SMALL, images=image) == "roomy"


def test_instances_spread_over_hosts_that_fit() -> None:
    placement = _placement(host_record("a"), host_record("b"))
    chosen = []
    with contextlib.ExitStack() as creates_under_way:
        for _ in range(4):
            chosen.append(host := placement.instance_host(SMALL))
            creates_under_way.enter_context(placement.reserved(host, SMALL))
    assert sorted(chosen) == ["a", "a", "b", "b"]


def test_hosts_holding_a_requested_port_are_skipped() -> None:
    web = Demand(1, GIB, Hypervisor.QEMU, ports=frozenset({"8080/tcp"}))
    roomy = host_record("roomy", memory_total_bytes=64 * GIB, ports=["8080/tcp", "53/udp"])
    other = host_record("other", ports=["8080/udp"])
    assert _placement(roomy, other).instance_host(web) == "other"
    with pytest.raises(Conflict, match="8080/tcp") as info:
        _placement(roomy).instance_host(web)
    assert info.value.code == "port_in_use"
    with pytest.raises(Conflict, match="in use on host roomy"):
        _placement(roomy, other).instance_host(web, pinned_to="roomy")
    placement = _placement(other)  # a create of this gateway still under way holds it too
    with placement.reserved("other", web), pytest.raises(Conflict):
        placement.instance_host(web)


@pytest.mark.anyio
async def test_a_bus_failure_is_a_503_not_a_500() -> None:
    async def broken(request: Request) -> Response:
        raise nats.errors.NoServersError()

    app = Starlette(routes=[Route("/x", broken)], exception_handlers=EXCEPTION_HANDLERS)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.get("/x")
    assert response.status_code == 503
    assert response.json()["code"] == "nats_unavailable"
    assert response.headers["x-should-retry"] == "true"


@pytest.mark.anyio
async def test_a_future_cancelled_under_a_request_is_a_503_not_a_plain_500() -> None:
    async def dropped(request: Request) -> Response:
        # What nats-py does to a pending reply when its connection closes.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.cancel)
        await future
        raise AssertionError("unreachable")

    app = Starlette(
        routes=[Route("/x", dropped)],
        middleware=[Middleware(StrayCancellation)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        response = await client.get("/x")
    assert response.status_code == 503
    assert response.json()["code"] == "nats_unavailable"
