"""`vmfleet gateway` and `vmfleet worker`: one component each, stopped by SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal

import anyio
from anyio.abc import TaskStatus

from cli.settings import Settings
from gateway import GatewayConfig, create_app
from gateway.server import bind, serve
from natsbus import BusOptions, Layout
from worker import WorkerConfig, run_worker
from worker.network import NetworkSettings

__all__ = ["cancel_on_signal", "run_gateway_daemon", "run_worker_daemon"]

log = logging.getLogger(__name__)


async def run_gateway_daemon(settings: Settings, host: str, port: int) -> None:
    assert settings.jwt_secret is not None
    config = GatewayConfig(
        bus=BusOptions(urls=settings.nats_urls, name="vmfleet-gateway"),
        jwt_secret=settings.jwt_secret,
        subject_prefix=settings.subject_prefix,
        layout=Layout(replicas=settings.replicas),
    )
    sock = bind(host, port)
    async with anyio.create_task_group() as tg:
        await tg.start(cancel_on_signal, tg.cancel_scope)
        await tg.start(serve, create_app(config), sock)


async def run_worker_daemon(settings: Settings) -> None:
    config = WorkerConfig(
        host_id=settings.host_id,
        data_dir=settings.data_dir,
        bus=BusOptions(urls=settings.nats_urls, name=f"vmfleet-worker-{settings.host_id}"),
        subject_prefix=settings.subject_prefix,
        hypervisor=settings.hypervisor,
        layout=Layout(replicas=settings.replicas),
        assets_dir=settings.assets_dir,
        log_max_bytes=settings.log_max_bytes,
        labels=dict(settings.host_labels),
        network=NetworkSettings(
            mode=settings.network, publish_addr=settings.publish_addr, subnet=settings.subnet
        ),
        kernel=settings.kernel,
        initrd=settings.initrd,
        insecure_registries=settings.insecure_registries,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(cancel_on_signal, tg.cancel_scope)
        await tg.start(run_worker, config)


async def cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` at the first SIGINT or SIGTERM.

    Started first in a daemon's task group, so that a signal arriving while the other
    components are still starting is a clean stop rather than the default abrupt exit.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            scope.cancel()
            return
