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
