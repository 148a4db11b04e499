"""API tokens: HS256 JWTs like hypeman's, and where the signing secret comes from.

A token may be limited to some of the scopes ``read``, ``write`` and ``exec`` (the
``scopes`` claim; ``gateway.auth`` says which route needs which). A token minted without
scopes has every right, as hypeman's tokens do.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import jwt

__all__ = ["SECRET_FILE", "load_or_create_secret", "mint_token", "read_secret"]

SECRET_FILE = "jwt_secret"


def mint_token(
    secret: str,
    *,
    subject: str = "vmfleet-user",
    ttl_s: int = 24 * 3600,
    scopes: Sequence[str] | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "iat": now, "exp": now + ttl_s}
    if scopes is not None:
        claims["scopes"] = list(scopes)
    return jwt.encode(claims, secret, algorithm="HS256")


def read_secret(jwt_secret: str | None, data_dir: Path) -> str | None:
    """JWT_SECRET when set, else the secret `vmfleet dev` keeps in the data dir."""
    if jwt_secret:
        return jwt_secret
    path = data_dir / SECRET_FILE
    try:
        return path.read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None


def load_or_create_secret(jwt_secret: str | None, data_dir: Path) -> str:
    """As read_secret, creating a random secret (mode 0600) on first use."""
    existing = read_secret(jwt_secret, data_dir)
    if existing:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path = data_dir / SECRET_FILE
    # O_EXCL: two dev stacks starting at once on one data dir must agree on one secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secret + "\n")
    return secret
