"""The NATS layout is created once, and creating it again changes nothing."""

from __future__ import annotations

from pathlib import Path

import anyio
import nats
import pytest
from nats.js.api import RetentionPolicy

from natsbus import Layout, provision
from schemas.subjects import Subjects
from tests.support.cluster import NatsCluster

pytestmark = pytest.mark.anyio


async def test_provision_is_idempotent(nats_url: str, subject_prefix: str) -> None:
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, subjects, Layout())
        await provision(js, subjects, Layout())

        commands = await js.stream_info(subjects.commands_stream)
        assert commands.config.retention == RetentionPolicy.WORK_QUEUE
        assert commands.config.duplicate_window == Layout().command_dedupe_window_s
        logs = await js.stream_info(subjects.logs_stream)
        assert logs.config.max_msgs_per_subject == Layout().logs_max_msgs_per_subject

        hosts = await js.key_value(subjects.hosts_bucket)
        assert (await hosts.status()).ttl == Layout().host_ttl_s
        for bucket in (subjects.instances_bucket, subjects.volumes_bucket, subjects.images_bucket):
            await js.key_value(bucket)
        await js.object_store(subjects.archives_bucket)
    finally:
        await nc.close()


async def test_changed_limits_reach_an_existing_stream(nats_url: str, subject_prefix: str) -> None:
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, subjects, Layout())
        await provision(js, subjects, Layout(logs_max_msgs_per_subject=1000))
        logs = await js.stream_info(subjects.logs_stream)
        assert logs.config.max_msgs_per_subject == 1000
    finally:
        await nc.close()


async def test_provision_waits_for_a_cluster_that_does_not_answer_yet(tmp_path: Path) -> None:
    """Two of three servers down: JetStream has no quorum and drops every request. Start-up
    keeps asking instead of failing, and finishes once the cluster answers again."""
    cluster = NatsCluster(tmp_path / "cluster")
    await anyio.to_thread.run_sync(cluster.start)
    subjects = Subjects("pwait")
    nc = await nats.connect(cluster.urls[0])
    provisioned = anyio.Event()
    try:
        for server in cluster.servers[1:]:
            await anyio.to_thread.run_sync(server.stop)
        js = nc.jetstream(timeout=1.0)

        async def provision_then_tell() -> None:
            await provision(js, subjects, Layout(replicas=3))
            provisioned.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(provision_then_tell)
            await anyio.sleep(3)  # several lookups without an answer
            assert not provisioned.is_set()
            for server in cluster.servers[1:]:
                await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(60):
                await provisioned.wait()

        commands = await js.stream_info(subjects.commands_stream)
        assert commands.config.num_replicas == 3
    finally:
        await nc.close()
        await anyio.to_thread.run_sync(cluster.stop)
