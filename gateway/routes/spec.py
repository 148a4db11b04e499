"""``/spec.yaml`` and ``/spec.json``: the API description vmfleet serves (public routes).

Built once per app (``gateway.openapi``) and kept rendered in ``app.state``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["routes"]


async def spec_yaml(request: Request) -> Response:
    return Response(request.app.state.spec_yaml, media_type="application/vnd.oai.openapi")


async def spec_json(request: Request) -> Response:
    return Response(request.app.state.spec_json, media_type="application/json")


routes = [
    Route("/spec.yaml", spec_yaml, methods=["GET"]),
    Route("/spec.json", spec_json, methods=["GET"]),
]
