"""A running worker is in the fleet's hosts bucket, with its capacity."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import nats
import pytest

from natsbus import BusOptions
from schemas.codec import decode_host_record
from schemas.subjects import Subjects
from worker import WorkerConfig, run_worker

pytestmark = pytest.mark.anyio


async def test_worker_registers_its_host(
    nats_url: str, subject_prefix: str, tmp_path: Path, test_assets: Path
) -> None:
    config = WorkerConfig(
        host_id="host-a",
        data_dir=tmp_path,
        assets_dir=test_assets,
        bus=BusOptions(urls=(nats_url,)),
        subject_prefix=subject_prefix,
        labels={"zone": "test"},
    )
    nc = await nats.connect(nats_url)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run_worker, config)
            kv = await nc.jetstream().key_value(Subjects(subject_prefix).hosts_bucket)
            record = decode_host_record((await kv.get("host-a")).value or b"")
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
    assert record.id == "host-a"
    assert record.vcpus_total == os.cpu_count()
    assert record.memory_total_bytes > 0
    assert 0 < record.disk_free_bytes <= record.disk_total_bytes
    assert record.labels == {"zone": "test"}
