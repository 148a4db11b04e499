"""``/ui``: a browser view of the fleet, off unless the operator turns it on (``VMFLEET_UI``).

The view is three static files (``gateway/ui/``) and carries no data and no secret, so
it is served ahead of :class:`gateway.auth.BearerAuth`: a browser navigating to ``/ui``
cannot send an ``Authorization`` header. Everything the page shows it fetches from the
API like any other client, with the token the user gives it, in that header (never in a
URL); the API routes stay exactly as guarded as before.

Turned off, ``/ui`` and everything under it is a 404 in the API's error shape, with or
without a token. The responses forbid inline script, framing and any origin but the
gateway's own (``Content-Security-Policy``), so the token the page holds can only go back
to the gateway it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import EXCEPTION_HANDLERS
from schemas.errors import NotFound

__all__ = ["UI_PREFIX", "UiPages"]

UI_PREFIX: Final = "/ui"
_FILES_DIR: Final = Path(__file__).parents[1] / "ui"
#: What the page may load, by file name under ``/ui/``, and its media type.
_ASSETS: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


class UiPages:
    """ASGI middleware: answers ``/ui`` and ``/ui/...`` itself, passes the rest on.

    It sits between the metrics middleware and the bearer check, so its requests are
    counted (route templates ``/ui`` and ``/ui/{file}``) and never asked for a token.
    """

    def __init__(self, app: ASGIApp, *, enabled: bool) -> None:
        self.app = app
        router = Router(routes=_routes()) if enabled else Router(default=_turned_off)
        # A router of its own, behind the app's exception handlers: a wrong method or an
        # unknown file is the same JSON error as anywhere else in the API.
        self.pages = ExceptionMiddleware(router, handlers=EXCEPTION_HANDLERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_ui_path(scope["path"]):
            await self.pages(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_ui_path(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


async def _turned_off(scope: Scope, receive: Receive, send: Send) -> None:
    raise NotFound("the browser view is turned off (VMFLEET_UI=1 turns it on)")


def _routes() -> list[Route]:
    page = (_FILES_DIR / "index.html").read_bytes()
    assets = {name: (_FILES_DIR / name).read_bytes() for name in _ASSETS}

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["file"]
        if name not in assets:
            raise NotFound(f"{UI_PREFIX}/{name} not found")
        return Response(assets[name], media_type=_ASSETS[name], headers=_HEADERS)

    return [
        Route(UI_PREFIX, index, methods=["GET"]),
        Route(UI_PREFIX + "/{file}", asset, methods=["GET"]),
    ]
