"""Logs of a real guest as SSE: a follow that spans a standby and a restore sees every
line once, in order; ``tail=N`` is exactly the stream's last N lines; a follow ends when
the instance is deleted."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import anyio
import nats
import pytest
from nats.js.api import DeliverPolicy

from schemas.codec import decode_log_line
from schemas.subjects import Subjects
from tests.gateway.conftest import Fleet

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

TICKER = 'i=0; while true; do i=$((i+1)); echo "tick $i <&>"; sleep 0.1; done'


async def _ticks(lines: AsyncIterator[str], until: int) -> list[int]:
    """Tick numbers of the data lines read until tick ``until`` has been seen."""
    ticks: list[int] = []
    async for raw in lines:
        if raw.startswith("data: ") and (m := re.fullmatch(r"tick (\d+) <&>", json.loads(raw[6:]))):
            ticks.append(int(m.group(1)))
            if ticks[-1] >= until:
                return ticks
    raise AssertionError("the log stream ended")


async def _all_lines(fleet: Fleet, instance_id: str) -> list[str]:
    nc = await nats.connect(fleet.nats_url)
    subjects = Subjects(fleet.prefix)
    try:
        js = nc.jetstream()
        subject = subjects.logs(instance_id, "app")
        info = await js.stream_info(subjects.logs_stream, subjects_filter=subject)
        total = (info.state.subjects or {}).get(subject, 0)
        sub = await js.subscribe(subject, deliver_policy=DeliverPolicy.ALL, ordered_consumer=True)
        lines = [decode_log_line((await sub.next_msg(timeout=10)).data).line for _ in range(total)]
        await sub.unsubscribe()
        return lines
    finally:
        await nc.close()


async def test_follow_spans_standby_and_restore(fleet: Fleet, busybox_image: str) -> None:
    body = {
        "name": "ticker",
        "image": busybox_image,
        "size": "256MB",
        "vcpus": 1,
        "cmd": ["/bin/sh", "-c", TICKER],
    }
    async with fleet.api.async_client() as client:
        created = await client.post("/instances", json=body)
        assert created.status_code == 201, created.text
        instance_id = created.json()["id"]
        params = {"follow": "true", "tail": 3}
        async with client.stream("GET", "/instances/ticker/logs", params=params) as stream:
            lines = stream.aiter_lines()
            seen = await _ticks(lines, until=10)
            assert (await client.post("/instances/ticker/standby")).json()["state"] == "Standby"
            await anyio.sleep(1)
            assert (await client.post("/instances/ticker/restore")).json()["state"] == "Running"
            seen += await _ticks(lines, until=seen[-1] + 20)
        assert seen == list(range(seen[0], seen[0] + len(seen)))  # no gap, no repeat

        assert (await client.post("/instances/ticker/stop")).json()["state"] == "Stopped"
        await anyio.sleep(1)  # the last lines reach the stream
        everything = await _all_lines(fleet, instance_id)
        for tail in (1, 10, len(everything), len(everything) + 50):
            response = await client.get("/instances/ticker/logs", params={"tail": tail})
            served = [json.loads(x[6:]) for x in response.text.split("\n\n") if x]
            assert served == everything[-tail:], tail
        assert b"\\u003c\\u0026\\u003e" in (await client.get("/instances/ticker/logs")).content

        async with client.stream(
            "GET", "/instances/ticker/logs", params={"follow": "true", "tail": 0}
        ) as stream:
            assert (await client.delete(f"/instances/{instance_id}")).status_code == 204
            with anyio.fail_after(15):  # ends by itself once the instance is gone
                async for _ in stream.aiter_lines():
                    pass
