"""Liveness and the metrics scrape: public routes."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.responses import MsgspecResponse
from schemas.api import Health

__all__ = ["routes"]


async def health(request: Request) -> Response:
    return MsgspecResponse(Health(status="ok"))


async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
