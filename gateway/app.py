"""Assembling the ASGI app: routes, auth, error handling, and the NATS connection's life."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.auth import BearerAuth
from gateway.config import GatewayConfig
from gateway.errors import EXCEPTION_HANDLERS
from gateway.metrics import GatewayMetrics
from gateway.routes import fleet, health
from natsbus import connect, provision
from schemas.subjects import Subjects

__all__ = ["create_app"]


def create_app(config: GatewayConfig, *, registry: CollectorRegistry | None = None) -> Starlette:
    metrics = GatewayMetrics(registry or CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nc = await connect(config.bus)
        try:
            await provision(nc.jetstream(), Subjects(config.subject_prefix), config.layout)
            app.state.nats = nc
            yield
        finally:
            await nc.drain()

    app = Starlette(
        routes=[*health.routes, *fleet.routes],
        middleware=[Middleware(BearerAuth, secret=config.jwt_secret)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.metrics = metrics
    return app
