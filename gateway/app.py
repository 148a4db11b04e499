"""Assembling the ASGI app: routes, middleware, error handling, and the lifespan that owns
the NATS connection and the watched view of the fleet.

The lifespan holds a task group for the view's watchers, open for as long as the app
serves: Starlette enters and leaves the lifespan context in one task (it waits for
shutdown inside it), so the group is structured, and shutting the app down cancels the
watchers before the connection drains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import AsyncIterator

import anyio
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.auth import BearerAuth
from gateway.commands import CommandSender
from gateway.config import GatewayConfig
from gateway.errors import EXCEPTION_HANDLERS, StrayCancellation
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.openapi import build_spec, spec_json, spec_yaml
from gateway.placement import Placement
from gateway.routes import (
    autostandby,
    events,
    fleet,
    guest,
    health,
    images,
    instances,
    snapshots,
    spec,
    usage,
    volumes,
)
from gateway.routes.ui import UiPages
from gateway.service import Gateway
from gateway.sessions import GuestSessions
from gateway.view import FleetView
from natsbus import close, connect, provision
from schemas.subjects import Subjects

__all__ = ["create_app", "tune_garbage_collector"]


def tune_garbage_collector() -> None:
    """For a process that is the gateway and nothing else (``vmfleet gateway``, once it
    serves): a request leaves its garbage to reference counting, and the cycle collector's
    passes over the young objects of every few hundred allocations were ~6% of the
    gateway's CPU per create. Collect rarer, and leave what is loaded at start (modules, the
    view's first copy) out of the full passes for good. Not for a process that makes and
    drops apps (tests): what is frozen is never collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


#: Allocations between two collections of the youngest generation (CPython's default: 700).
_GC_YOUNG_THRESHOLD = 10_000


def create_app(config: GatewayConfig, *, registry: CollectorRegistry | None = None) -> Starlette:
    metrics = GatewayMetrics(registry or CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        views: list[FleetView] = []

        def resync_views() -> None:
            for view in views:
                view.resync()

        nc = await connect(dataclasses.replace(config.bus, on_reconnect=resync_views))
        try:
            subjects = Subjects(config.subject_prefix)
            js = nc.jetstream()
            await provision(js, subjects, config.layout)
            view = FleetView(js, subjects, host_ttl_s=config.layout.host_ttl_s)
            views.append(view)
            async with anyio.create_task_group() as tg:
                await tg.start(view.run)
                app.state.gateway = Gateway(
                    config=config,
                    subjects=subjects,
                    js=js,
                    view=view,
                    sender=CommandSender(nc, subjects, timeout_s=config.command_timeout_s),
                    placement=Placement(
                        view,
                        cpu_overcommit=config.cpu_overcommit,
                        memory_overcommit=config.memory_overcommit,
                    ),
                )
                app.state.guest_sessions = GuestSessions(nc, subjects)
                try:
                    yield
                finally:
                    del app.state.gateway
                    del app.state.guest_sessions
                    tg.cancel_scope.cancel()
        finally:
            await close(nc)

    served = build_spec()
    app = Starlette(
        routes=[
            *health.routes,
            *instances.hot_routes,
            *spec.routes,
            *fleet.routes,
            *events.routes,
            *instances.routes,
            *snapshots.routes,
            *usage.routes,
            *autostandby.routes,
            *guest.routes,
            *volumes.routes,
            *images.routes,
        ],
        middleware=[
            Middleware(StrayCancellation),
            Middleware(MetricsMiddleware, metrics=metrics),
            # Ahead of the bearer check: a browser cannot send a token to load the page.
            Middleware(UiPages, enabled=config.ui),
            Middleware(BearerAuth, secret=config.jwt_secret),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.metrics = metrics
    app.state.spec_yaml = spec_yaml(served)
    app.state.spec_json = spec_json(served)
    return app
