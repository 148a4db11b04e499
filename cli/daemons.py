"""`vmfleet gateway` and `vmfleet worker`: one component each, stopped by SIGINT/SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cli.settings import ConfigError, Settings
from gateway import GatewayConfig, create_app
from gateway.app import tune_garbage_collector
from gateway.server import bind, serve
from natsbus import BusOptions, BusRefused, Layout, connect, inbox_prefix
from schemas.subjects import Subjects
from worker import WorkerConfig, run_worker
from worker.commands import CommandsUnreachable
from worker.drivers.select import HypervisorUnavailable
from worker.network import NetworkSettings

__all__ = [
    "DaemonFailed",
    "bus_options",
    "cancel_on_signal",
    "gateway_config",
    "hypervisor_refusals",
    "metrics_app",
    "reach_nats",
    "run_gateway_daemon",
    "run_worker_daemon",
    "worker_config",
    "worker_give_ups",
]

log = logging.getLogger(__name__)


async def run_gateway_daemon(settings: Settings, host: str, port: int) -> None:
    assert settings.jwt_secret is not None
    config = gateway_config(settings, bus_options(settings, "vmfleet-gateway"), settings.jwt_secret)
    await reach_nats(config.bus)
    sock = bind(host, port)
    async with anyio.create_task_group() as tg:
        await tg.start(cancel_on_signal, tg.cancel_scope)
        await tg.start(serve, create_app(config), sock)
        tune_garbage_collector()
    log.info("gateway stopped")


async def run_worker_daemon(settings: Settings) -> None:
    bus = bus_options(settings, f"vmfleet-worker-{settings.host_id}", host=settings.host_id)
    config = worker_config(settings, bus)
    registry = CollectorRegistry()
    await reach_nats(config.bus)
    with hypervisor_refusals(), worker_give_ups():
        async with anyio.create_task_group() as tg:
            await tg.start(cancel_on_signal, tg.cancel_scope)
            if settings.metrics_addr is not None:
                # Bound before the worker starts: a taken port is one clear error at once.
                await tg.start(serve, metrics_app(registry), bind(*settings.metrics_addr))
            await tg.start(functools.partial(run_worker, config, registry=registry))
    log.info("worker %s stopped", config.host_id)


def gateway_config(
    settings: Settings, bus: BusOptions, jwt_secret: str, *, layout: Layout | None = None
) -> GatewayConfig:
    """The gateway's configuration from the settings (``vmfleet gateway`` and ``vmfleet
    dev`` both build it here)."""
    return GatewayConfig(
        bus=bus,
        jwt_secret=jwt_secret,
        subject_prefix=settings.subject_prefix,
        layout=layout or Layout(replicas=settings.replicas),
        ui=settings.ui,
        cpu_overcommit=settings.cpu_overcommit,
        memory_overcommit=settings.memory_overcommit,
    )


def worker_config(
    settings: Settings,
    bus: BusOptions,
    *,
    data_dir: Path | None = None,
    layout: Layout | None = None,
    stop_instances_on_exit: bool = False,
) -> WorkerConfig:
    """The worker's configuration from the settings (``vmfleet worker`` and ``vmfleet dev``
    both build it here); ``vmfleet dev`` passes its own data dir and owns its VMs."""
    return WorkerConfig(
        host_id=settings.host_id,
        data_dir=data_dir or settings.data_dir,
        bus=bus,
        subject_prefix=settings.subject_prefix,
        hypervisor=settings.hypervisor,
        layout=layout or Layout(replicas=settings.replicas),
        stop_instances_on_exit=stop_instances_on_exit,
        assets_dir=settings.assets_dir,
        log_max_bytes=settings.log_max_bytes,
        transfer_cache_bytes=settings.transfer_cache_bytes,
        templates=settings.templates,
        templates_disk_bytes=settings.templates_disk_bytes,
        labels=dict(settings.host_labels),
        network=NetworkSettings(
            mode=settings.network, publish_addr=settings.publish_addr, subnet=settings.subnet
        ),
        kernel=settings.kernel,
        initrd=settings.initrd,
        ch_binary=settings.ch_binary,
        agent_binary=settings.agent_binary,
        insecure_registries=settings.insecure_registries,
        cpu_overcommit=settings.cpu_overcommit,
        memory_overcommit=settings.memory_overcommit,
    )


def bus_options(settings: Settings, name: str, *, host: str | None = None) -> BusOptions:
    """How a gateway (``host`` None) or the worker on ``host`` connects: NATS_* settings,
    and the reply inbox its NATS user is allowed to read (natsbus.inbox_prefix)."""
    nats = settings.nats
    return BusOptions(
        urls=settings.nats_urls,
        name=name,
        user=nats.user,
        password=nats.password,
        token=nats.token,
        credentials_file=str(nats.creds) if nats.creds else None,
        tls_ca_file=str(nats.tls_ca) if nats.tls_ca else None,
        tls_cert_file=str(nats.tls_cert) if nats.tls_cert else None,
        tls_key_file=str(nats.tls_key) if nats.tls_key else None,
        inbox_prefix=inbox_prefix(Subjects(settings.subject_prefix), host),
    )


async def reach_nats(bus: BusOptions, *, wait_s: float = 5.0) -> None:
    """Connect once before starting anything: NATS refusing the credentials or the TLS
    setup stops start-up with one line naming the setting (exit 2), not a traceback.

    A NATS that does not answer within ``wait_s`` is not an error here: the component's
    own connection waits for it, as it always has.
    """
    try:
        nc = await connect(dataclasses.replace(bus, first_connect_timeout_s=wait_s))
    except BusRefused as exc:
        raise ConfigError(str(exc)) from None
    except TimeoutError:
        log.info("NATS does not answer yet; starting, and connecting when it does")
        return
    await nc.close()


def metrics_app(registry: CollectorRegistry) -> Starlette:
    """The worker's own Prometheus scrape target (the gateway serves its own /metrics)."""

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])


@contextlib.contextmanager
def hypervisor_refusals() -> Iterator[None]:
    """A hypervisor that cannot run here stops start-up with its one line (exit 2, as a
    configuration error), not with a traceback out of the task group."""
    try:
        yield
    except* HypervisorUnavailable as group:
        raise ConfigError(str(group.exceptions[0])) from None


class DaemonFailed(Exception):
    """A daemon gave up on its own (its message says why); the process exits 1."""


@contextlib.contextmanager
def worker_give_ups() -> Iterator[None]:
    """A worker that gives up (it cannot fetch its commands) ends the process with one
    line and exit 1, so that its supervisor starts a fresh one; not with a traceback."""
    try:
        yield
    except* CommandsUnreachable as group:
        raise DaemonFailed(str(_innermost(group))) from None


def _innermost(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in ``group``, however deep task groups nested it."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


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
