"""Bearer-token authentication, as hypeman does it: HS256 JWTs signed with JWT_SECRET."""

from __future__ import annotations

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.responses import error_response
from schemas.errors import Unauthorized

__all__ = ["PUBLIC_PATHS", "BearerAuth", "verify_token"]

#: Routes anyone may call: liveness, the API description and the metrics scrape.
PUBLIC_PATHS = frozenset({"/health", "/spec.yaml", "/spec.json", "/metrics"})

#: Claims that mark a token minted for something else (registry pushes, builders).
_FOREIGN_CLAIMS = ("repos", "scope", "build_id")


def verify_token(header: str | None, secret: str) -> str:
    """Return the token's subject, or raise Unauthorized with hypeman's reason text."""
    if not header:
        raise Unauthorized("security requirements failed: authorization header required")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("security requirements failed: invalid authorization header format")
    try:
        claims = jwt.decode(
            token.strip(),
            secret,
            algorithms=["HS256", "HS384", "HS512"],
            options={"require": ["exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("security requirements failed: token has expired") from None
    except jwt.PyJWTError:
        raise Unauthorized("security requirements failed: invalid token") from None
    if any(claim in claims for claim in _FOREIGN_CLAIMS):
        raise Unauthorized("security requirements failed: invalid token type")
    return str(claims.get("sub", ""))


class BearerAuth:
    """ASGI middleware: every HTTP route outside PUBLIC_PATHS needs a valid token."""

    def __init__(self, app: ASGIApp, *, secret: str) -> None:
        self.app = app
        self.secret = secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        try:
            scope.setdefault("state", {})["subject"] = verify_token(header, self.secret)
        except Unauthorized as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
