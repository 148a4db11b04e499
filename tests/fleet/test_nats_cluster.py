"""A 3-node NATS cluster: losing one server loses no record and no log line, and the API
keeps working."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from natsbus import Layout
from tests.support.cluster import NatsCluster
from tests.support.fleet import WorkerProcess
from tests.support.gateway import running_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

TICKER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done'


async def until_not_503(
    call: Callable[[str], Awaitable[httpx.Response]], path: str
) -> httpx.Response:
    with anyio.fail_after(60):
        while (response := await call(path)).status_code == 503:
            assert response.headers["x-should-retry"] == "true"
            await anyio.sleep(1)
    return response


async def test_api_survives_the_loss_of_one_nats_server(
    tmp_path: Path, test_assets: Path, busybox_image: str, subject_prefix: str
) -> None:
    cluster = NatsCluster(tmp_path / "cluster")
    await anyio.to_thread.run_sync(cluster.start)
    urls = ",".join(cluster.urls)
    worker = WorkerProcess(urls, subject_prefix, test_assets, VMFLEET_REPLICAS="3")
    worker.start()
    try:
        with running_gateway(urls, subject_prefix, layout=Layout(replicas=3)) as gw:
            async with gw.async_client() as client:
                with anyio.fail_after(120):
                    while not (await client.get("/hosts")).json():
                        await anyio.sleep(0.2)
                body = {
                    "name": "ha",
                    "image": busybox_image,
                    "size": "256MB",
                    "vcpus": 1,
                    "cmd": ["/bin/sh", "-c", TICKER],
                }
                created = await client.post("/instances", json=body)
                assert created.status_code == 201, created.text
                iid = created.json()["id"]
                with anyio.fail_after(120):  # some ticks before the fault
                    while (
                        '"tick 5"'
                        not in (
                            await client.get(f"/instances/{iid}/logs", params={"tail": 100})
                        ).text
                    ):
                        await anyio.sleep(0.2)

                await anyio.to_thread.run_sync(cluster.servers[0].kill)

                # While the cluster fails over, the gateway may answer 503 (retryable, as the
                # SDK does by itself); within seconds the call goes through, exactly once.
                with anyio.fail_after(60):
                    while (
                        stopped := await client.post(f"/instances/{iid}/stop")
                    ).status_code == 503:
                        assert stopped.headers["x-should-retry"] == "true"
                        await anyio.sleep(1)
                assert stopped.status_code == 200, stopped.text
                with anyio.fail_after(30):
                    while (await client.get(f"/instances/{iid}")).json()["state"] != "Stopped":
                        await anyio.sleep(0.2)
                with anyio.fail_after(60):
                    while True:  # every line the guest printed reached the stream, in order
                        logs = await client.get(f"/instances/{iid}/logs", params={"tail": 10000})
                        ticks = [int(n) for n in re.findall(r'"tick (\d+)"', logs.text)]
                        if ticks and len(ticks) == ticks[-1]:
                            break
                        await anyio.sleep(0.5)
                assert ticks == list(range(1, len(ticks) + 1)) and len(ticks) >= 5
                deleted = await until_not_503(client.delete, f"/instances/{iid}")
                assert deleted.status_code == 204, deleted.text
    finally:
        worker.cleanup()
        await anyio.to_thread.run_sync(cluster.stop)
