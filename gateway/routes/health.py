"""Liveness, readiness and the metrics scrape: public routes.

``/health`` is hypeman's: the gateway answers. ``/ready`` (a vmfleet extension) says
whether the fleet can take work: 200 once a live, undrained host heartbeats, else 503 with
the same body, so a load balancer or a script can wait for a fresh fleet."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.responses import MsgspecResponse
from gateway.service import gateway
from schemas.api import Health, Readiness

__all__ = ["routes"]


async def health(request: Request) -> Response:
    return MsgspecResponse(Health(status="ok"))


async def ready(request: Request) -> Response:
    view = gateway(request).view
    live = view.live_hosts()
    undrained = [h for h in live if h.id not in view.drains]
    body = Readiness(ready=bool(undrained), live_hosts=len(live), undrained_hosts=len(undrained))
    return MsgspecResponse(body, status_code=200 if body.ready else 503)


async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
