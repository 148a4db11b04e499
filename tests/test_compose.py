"""compose.yaml is a valid compose file (validated without a Docker engine)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_compose_file_validates() -> None:
    env = {**os.environ, "JWT_SECRET": "s" * 32}
    done = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"nats-1", "nats-2", "nats-3", "gateway-1", "gateway-2", "worker-1", "worker-2"} <= set(
        services
    )
    hosts = {services[w]["environment"]["VMFLEET_HOST_ID"] for w in ("worker-1", "worker-2")}
    assert hosts == {"worker-1", "worker-2"}
    assert all(
        services[w]["environment"]["VMFLEET_REPLICAS"] == "3" for w in ("worker-1", "gateway-1")
    )


def test_compose_requires_a_jwt_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    done = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode != 0
    assert "JWT_SECRET" in done.stderr
