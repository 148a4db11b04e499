"""Bearer-token authentication, as hypeman does it: HS256 JWTs signed with JWT_SECRET,
plus vmfleet's token scopes.

A token may carry a ``scopes`` claim, a list of ``read``, ``write`` and ``exec``
(``vmfleet token --scopes``). A token without the claim has every right, as hypeman's
tokens do. What each route needs (docs/security.md):

- ``exec``: the exec and cp WebSockets (they run code in, and write files into, a guest);
- ``read``: every other GET (and HEAD): lists, records, logs, events, ``/wait``, ``stat``;
- ``write``: every other method (create, delete, lifecycle, volumes, images, drains).

WebSocket upgrades are checked like HTTP requests, and refused before the upgrade.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Final, Literal, get_args

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.responses import error_response
from schemas.errors import Unauthorized, VmfleetError

__all__ = [
    "PUBLIC_PATHS",
    "SCOPES",
    "BearerAuth",
    "Forbidden",
    "TokenIdentity",
    "TokenScope",
    "parse_scopes",
    "required_scope",
    "verify_identity",
    "verify_token",
]

TokenScope = Literal["read", "write", "exec"]
SCOPES: Final[tuple[str, ...]] = get_args(TokenScope)

#: Paths whose every use runs code in a guest or writes into it.
_EXEC_PATH: Final = re.compile(r"^/instances/[^/]+/(exec|cp)/?$")
_READ_METHODS: Final = frozenset({"GET", "HEAD"})


class Forbidden(VmfleetError):
    status = 403
    code = "forbidden"


@dataclass(frozen=True)
class TokenIdentity:
    subject: str
    #: None: a token minted without scopes, which may do everything.
    scopes: frozenset[str] | None

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


#: Routes anyone may call: liveness, the API description and the metrics scrape.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/spec.yaml", "/spec.json", "/metrics"})

#: Claims that mark a token minted for something else (registry pushes, builders).
_FOREIGN_CLAIMS = ("repos", "scope", "build_id")


def verify_token(header: str | None, secret: str) -> str:
    """Return the token's subject, or raise Unauthorized with hypeman's reason text."""
    return verify_identity(header, secret).subject


def verify_identity(header: str | None, secret: str) -> TokenIdentity:
    """The token's subject and scopes, or Unauthorized with hypeman's reason text."""
    return _verify_with_expiry(header, secret)[0]


def _verify_with_expiry(header: str | None, secret: str) -> tuple[TokenIdentity, float]:
    """verify_identity, and the token's expiry (seconds since the epoch)."""
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
    identity = TokenIdentity(str(claims.get("sub", "")), _scopes(claims.get("scopes")))
    return identity, float(claims["exp"])


def _scopes(claim: object) -> frozenset[str] | None:
    if claim is None:
        return None
    if not isinstance(claim, list) or not all(isinstance(item, str) for item in claim):
        raise Unauthorized("security requirements failed: invalid token scopes")
    return frozenset(claim)


def required_scope(method: str, path: str) -> TokenScope:
    """The scope a request needs (see the module doc)."""
    if _EXEC_PATH.match(path):
        return "exec"
    return "read" if method in _READ_METHODS else "write"


def parse_scopes(text: str) -> list[str]:
    """``read,write`` → ``["read", "write"]``; ValueError naming an unknown scope."""
    scopes = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma-separated list of {', '.join(SCOPES)}")
    return sorted(set(scopes), key=SCOPES.index)


def _check_scope(identity: TokenIdentity, method: str, path: str) -> None:
    needed = required_scope(method, path)
    if not identity.allows(needed):
        raise Forbidden(f"this token lacks the '{needed}' scope")


#: How many verified tokens the middleware remembers (a client keeps one token for many
#: requests; past this many, the memory starts afresh).
_VERIFIED_CACHE_SIZE = 1024


class BearerAuth:
    """ASGI middleware: every HTTP route outside PUBLIC_PATHS needs a valid token.

    A verified token is remembered until it expires: checking its HMAC and claims again is
    the same answer, and was most of what a cached read costs. Only the expiry changes with
    time, and it is checked on every use.
    """

    def __init__(self, app: ASGIApp, *, secret: str) -> None:
        self.app = app
        self.secret = secret
        self._verified: dict[str, tuple[TokenIdentity, float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        try:
            identity = self._identity(header)
            _check_scope(identity, scope.get("method", "GET"), scope["path"])
        except (Unauthorized, Forbidden) as exc:
            # For a WebSocket this is the denial response: an HTTP answer, no upgrade.
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["subject"] = identity.subject
        await self.app(scope, receive, send)

    def _identity(self, header: str | None) -> TokenIdentity:
        """verify_identity, answered from memory for a token verified before and not expired."""
        if header is not None and (known := self._verified.get(header)) is not None:
            identity, expires = known
            if time.time() < expires:
                return identity
            del self._verified[header]
        identity, expires = _verify_with_expiry(header, self.secret)
        if header is not None:
            if len(self._verified) >= _VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[header] = (identity, expires)
        return identity


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
