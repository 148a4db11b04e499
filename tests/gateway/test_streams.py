"""Log and event streams as SSE, read straight from JetStream (no VM: the lines and events
are published here as a worker would; the VM-backed version is in test_vm_logs.py)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import nats
import pytest
from hypeman import AsyncHypeman

from schemas.api import InstanceState
from schemas.codec import encode
from schemas.messages import LogLine, StateEvent
from tests.support.gateway import Bus, GatewayHandle, instance_record, running_gateway

pytestmark = pytest.mark.anyio

A = "a" + "1" * 23
B = "a" + "2" * 23


async def _line(bus: Bus, instance: str, source: str, seq: int, text: str) -> None:
    line = LogLine(instance_id=instance, source=source, seq=seq, line=text, at=datetime.now(UTC))  # type: ignore[arg-type]
    await bus.js.publish(bus.subjects.logs(instance, source), encode(line))


async def _instance(gw: GatewayHandle, bus: Bus, instance_id: str, host: str = "gone") -> None:
    await bus.put(
        bus.subjects.instances_bucket,
        instance_id,
        instance_record(instance_id, "i" + instance_id[:5], host),
    )
    async with gw.async_client() as client:
        with anyio.fail_after(10):
            while (await client.get(f"/instances/{instance_id}")).status_code != 200:
                await anyio.sleep(0.02)


async def _events(lines: AsyncIterator[str], count: int) -> list[str]:
    """The next ``count`` data payloads (keep-alive comments are skipped)."""
    found: list[str] = []
    async for raw in lines:
        if raw.startswith("data: "):
            found.append(raw.removeprefix("data: "))
            if len(found) == count:
                break
    return found


async def test_tail_is_exactly_the_last_n_lines(gw: GatewayHandle, bus: Bus) -> None:
    await _instance(gw, bus, A)  # its host is not live: the logs are still served
    for i in range(1, 301):
        await _line(bus, A, "app", i, f"a-{i}")
        await _line(bus, B, "app", i, f"b-{i}")
        if i % 3 == 0:
            await _line(bus, A, "ops", i // 3, f"ops-{i}")
    async with gw.async_client() as client:
        for tail in (0, 1, 7, 100, 299, 300, 5000):
            response = await client.get(f"/instances/{A}/logs", params={"tail": tail})
            lines = [json.loads(x[6:]) for x in response.text.split("\n\n") if x]
            assert lines == [f"a-{i}" for i in range(max(1, 301 - tail), 301)], tail
        default = (await client.get(f"/instances/{A}/logs")).text
        assert default.count("data: ") == 100
        ops = (
            await client.get(f"/instances/{A}/logs", params={"source": "hypeman", "tail": 2})
        ).text
        assert ops == 'data: "ops-297"\n\ndata: "ops-300"\n\n'
        assert (
            await client.get(f"/instances/{A}/logs", params={"source": "ops"})
        ).status_code == 400
        assert (await client.get(f"/instances/{A}/logs", params={"tail": "-1"})).status_code == 400
        assert (
            await client.get(f"/instances/{A}/logs", params={"follow": "yes"})
        ).status_code == 400


async def test_lines_are_encoded_as_go_does(gw: GatewayHandle, bus: Bus) -> None:
    await _instance(gw, bus, A)
    await _line(bus, A, "app", 1, 'key="v" <b>&\t\x01\u2028é')
    async with gw.async_client() as client:
        response = await client.get(f"/instances/{A}/logs")
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.content == (
        b'data: "key=\\"v\\" \\u003cb\\u003e\\u0026\\t\\u0001\\u2028\xc3\xa9"\n\n'
    )


async def test_follow_continues_without_gap_and_ends_on_delete(gw: GatewayHandle, bus: Bus) -> None:
    await _instance(gw, bus, A)
    for i in range(1, 21):
        await _line(bus, A, "app", i, f"line {i}")
    async with gw.async_client() as client:
        params = {"tail": 5, "follow": "true"}
        async with client.stream("GET", f"/instances/{A}/logs", params=params) as response:
            lines = response.aiter_lines()
            backlog = await _events(lines, 5)
            for i in range(21, 31):
                await _line(bus, A, "app", i, f"line {i}")
            followed = await _events(lines, 10)
            await bus.delete(bus.subjects.instances_bucket, A)
            with anyio.fail_after(10):  # the stream ends by itself
                rest = [x async for x in lines if x.startswith("data")]
    assert [json.loads(x) for x in backlog + followed] == [f"line {i}" for i in range(16, 31)]
    assert rest == []


@pytest.fixture
async def chatty(nats_url: str) -> AsyncIterator[tuple[GatewayHandle, Bus]]:
    prefix = "k" + secrets.token_hex(4)
    with running_gateway(nats_url, prefix, keepalive_s=0.1) as handle:
        nc = await nats.connect(nats_url)
        try:
            yield handle, Bus(nc, prefix)
        finally:
            await nc.close()


async def test_keepalives_are_comments_the_sdk_skips(chatty: tuple[GatewayHandle, Bus]) -> None:
    gw, bus = chatty
    await _instance(gw, bus, A)
    sdk = AsyncHypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)

    async def publish_later() -> None:
        await anyio.sleep(0.5)  # several keep-alives first
        await _line(bus, A, "app", 1, "late <line>")

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish_later)
        stream = await sdk.instances.logs(A, follow=True, tail=0)
        async with stream:
            async for line in stream:
                assert line == "late <line>"
                break
    async with (
        gw.async_client() as client,
        client.stream(
            "GET", f"/instances/{A}/logs", params={"follow": "true", "tail": 0}
        ) as response,
    ):
        chunks = []
        async for chunk in response.aiter_text():
            chunks.append(chunk)
            if len(chunks) == 2:
                break
    assert chunks == [": keep-alive\n\n", ": keep-alive\n\n"]
    await sdk.close()


async def _state(bus: Bus, host: str, instance: str, state: InstanceState) -> int:
    event = StateEvent(instance_id=instance, host=host, state=state, at=datetime.now(UTC))
    ack = await bus.js.publish(bus.subjects.state(host, instance), encode(event))
    return ack.seq


async def test_events_filter_and_resume_after_last_event_id(gw: GatewayHandle, bus: Bus) -> None:
    await _instance(gw, bus, A)
    first = await _state(bus, "h1", A, InstanceState.CREATED)
    await _state(bus, "h2", B, InstanceState.CREATED)
    second = await _state(bus, "h1", A, InstanceState.RUNNING)
    async with gw.async_client() as client:
        headers = {"Last-Event-ID": str(first)}
        async with client.stream(
            "GET", "/events", params={"instance": A[:6]}, headers=headers
        ) as response:
            lines = []
            async for raw in response.aiter_lines():
                lines.append(raw)
                if raw.startswith("data: "):
                    break
        assert lines[0] == f"id: {second}"
        assert json.loads(lines[1].removeprefix("data: "))["state"] == "Running"

        async with client.stream("GET", "/events", params={"host": "h2"}) as response:
            await anyio.sleep(0.3)  # only events after the request: publish one now
            newest = await _state(bus, "h2", B, InstanceState.STOPPED)
            lines = []
            async for raw in response.aiter_lines():
                lines.append(raw)
                if raw.startswith("data: "):
                    break
        assert lines[0] == f"id: {newest}"
        for bad in ({"host": "a.b"}, {"instance": "*"}):
            assert (await client.get("/events", params=bad)).status_code == 400
        assert (await client.get("/events", headers={"Last-Event-ID": "x"})).status_code == 400


async def test_follow_is_not_cut_after_a_minute(gw: GatewayHandle, bus: Bus) -> None:
    """Proxies and servers often cut a response at 60 s; hypeman's follow stays open. Read
    with hypeman's SDK and its default timeouts, as a user would."""
    await _instance(gw, bus, A)
    sdk = AsyncHypeman(api_key=gw.token, base_url=gw.base_url, max_retries=0)

    async def publish_after_a_minute() -> None:
        await anyio.sleep(65)
        await _line(bus, A, "app", 1, "still here")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_after_a_minute)
            stream = await sdk.instances.logs(A, follow=True, tail=0)
            async with stream:
                with anyio.fail_after(120):
                    async for line in stream:
                        assert line == "still here"
                        break
    finally:
        await sdk.close()
