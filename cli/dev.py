"""`vmfleet dev`: NATS, one worker and the gateway in one process, stopped together.

Shutdown order matters: the gateway and worker stop first (the worker stops this host's
VMs, since a dev stack owns them), then nats-server, which flushes JetStream to disk so
the records survive for the next run.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio
from prometheus_client import CollectorRegistry

from cli.daemons import (
    cancel_on_signal,
    gateway_config,
    hypervisor_refusals,
    worker_config,
    worker_give_ups,
)
from cli.embedded_nats import NatsServerProcess
from cli.settings import Settings
from cli.token import load_or_create_secret, mint_token
from gateway import create_app
from gateway.server import bind, serve
from natsbus import BusOptions, Layout
from worker import run_worker

__all__ = ["DevOptions", "run_dev"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevOptions:
    port: int
    data_dir: Path
    nats_port: int | None
    host: str = "127.0.0.1"


async def run_dev(settings: Settings, options: DevOptions) -> None:
    secret = load_or_create_secret(settings.jwt_secret, options.data_dir)
    sock = bind(options.host, options.port)
    nats = NatsServerProcess(options.data_dir / "nats", port=options.nats_port)
    nats.start()
    try:
        await anyio.to_thread.run_sync(nats.wait_ready)
        await _run_components(settings, options, secret, nats.url, sock)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(nats.stop)
        sock.close()
    log.info("nats-server stopped")


async def _run_components(
    settings: Settings, options: DevOptions, secret: str, nats_url: str, sock: object
) -> None:
    registry = CollectorRegistry()
    layout = Layout(replicas=1)
    worker = worker_config(
        settings,
        BusOptions(urls=(nats_url,), name=f"vmfleet-worker-{settings.host_id}"),
        data_dir=options.data_dir,
        layout=layout,
        stop_instances_on_exit=True,
    )
    gateway = gateway_config(
        settings, BusOptions(urls=(nats_url,), name="vmfleet-gateway"), secret, layout=layout
    )
    with hypervisor_refusals(), worker_give_ups():
        async with anyio.create_task_group() as tg:
            await tg.start(cancel_on_signal, tg.cancel_scope)
            await tg.start(functools.partial(run_worker, worker, registry=registry))
            await tg.start(serve, create_app(gateway, registry=registry), sock)
            _print_banner(options, nats_url, mint_token(secret), ui=settings.ui)
    log.info("gateway and worker %s stopped", settings.host_id)


def _print_banner(options: DevOptions, nats_url: str, token: str, *, ui: bool) -> None:
    base_url = f"http://{options.host}:{options.port}"
    # The token rides in the fragment, which a browser never sends; the page removes it.
    ui_line = f"  UI:    {base_url}/ui#token={token}\n" if ui else ""
    print(
        f"vmfleet dev is up (Ctrl-C stops it, VMs included)\n"
        f"  API:   {base_url}\n"
        f"{ui_line}"
        f"  NATS:  {nats_url}\n"
        f"  data:  {options.data_dir}\n"
        f"  token: {token}\n"
        f"\n"
        f"export HYPEMAN_BASE_URL={base_url}\n"
        f"export HYPEMAN_API_KEY={token}\n",
        flush=True,
    )
