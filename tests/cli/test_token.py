"""`vmfleet token`: HS256 JWTs the gateway accepts, from JWT_SECRET or the dev secret."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import jwt

from cli.token import load_or_create_secret, read_secret

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


def test_token_from_jwt_secret_has_hypeman_claims() -> None:
    secret = "s" * 32
    done = subprocess.run(
        [VMFLEET, "token", "--subject", "alice", "--ttl", "60"],
        env={"JWT_SECRET": secret, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 60


def test_dev_secret_is_created_once_private(tmp_path: Path) -> None:
    first = load_or_create_secret(None, tmp_path)
    assert load_or_create_secret(None, tmp_path) == first
    assert read_secret(None, tmp_path) == first
    assert stat.S_IMODE((tmp_path / "jwt_secret").stat().st_mode) == 0o600


def test_token_without_any_secret_says_what_to_set(tmp_path: Path) -> None:
    done = subprocess.run(
        [VMFLEET, "token", "--data-dir", str(tmp_path)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "JWT_SECRET" in done.stderr


def _token(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VMFLEET, "token", *args],
        env={"JWT_SECRET": "s" * 32, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


def test_scopes_limit_a_token_and_none_means_every_right() -> None:
    scoped = jwt.decode(_token("--scopes", "exec, read").stdout.strip(), "s" * 32, ["HS256"])
    assert scoped["scopes"] == ["read", "exec"]
    unscoped = jwt.decode(_token().stdout.strip(), "s" * 32, ["HS256"])
    assert "scopes" not in unscoped
    refused = _token("--scopes", "read,admin")
    assert refused.returncode == 2
    assert "scopes must be a comma-separated list of read, write, exec" in refused.stderr
