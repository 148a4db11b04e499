"""The NATS layout is created once, and creating it again changes nothing."""

from __future__ import annotations

import nats
import pytest
from nats.js.api import RetentionPolicy

from natsbus import Layout, provision
from schemas.subjects import Subjects

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
