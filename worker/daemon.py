"""Wiring of the worker daemon: NATS, provisioning, heartbeats, and their shutdown."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from natsbus import connect, provision
from schemas.subjects import Subjects
from worker.config import WorkerConfig
from worker.heartbeat import heartbeat_loop

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


async def run_worker(
    config: WorkerConfig, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run until cancelled. Reports started once the host is registered in the fleet."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    nc = await connect(config.bus)
    try:
        js = nc.jetstream()
        subjects = Subjects(config.subject_prefix)
        await provision(js, subjects, config.layout)
        hosts = await js.key_value(subjects.hosts_bucket)
        async with anyio.create_task_group() as tg:
            await tg.start(heartbeat_loop, hosts, config)
            log.info("worker %s registered", config.host_id)
            task_status.started()
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.drain()
