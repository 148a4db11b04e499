"""Configuration: defaults, and one clear line naming the variable for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.settings import ConfigError, load_settings

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


def test_defaults() -> None:
    settings = load_settings({"VMFLEET_HOST_ID": "h1"})
    assert settings.port == 8080
    assert settings.nats_urls == ("nats://127.0.0.1:4222",)
    assert settings.hypervisor == "auto"
    assert settings.subject_prefix == "vmfleet"
    assert settings.jwt_secret is None


def test_several_nats_urls() -> None:
    settings = load_settings({"NATS_URL": "nats://a:4222, nats://b:4222"})
    assert settings.nats_urls == ("nats://a:4222", "nats://b:4222")


def test_subnet() -> None:
    assert load_settings({}).subnet == "10.100.0.0/16"
    assert load_settings({"VMFLEET_SUBNET": "10.200.0.0/24"}).subnet == "10.200.0.0/24"


def test_worker_metrics_listener() -> None:
    assert load_settings({}).metrics_addr == ("0.0.0.0", 9464)
    assert load_settings({"VMFLEET_METRICS_ADDR": "127.0.0.1:9100"}).metrics_addr == (
        "127.0.0.1",
        9100,
    )
    assert load_settings({"VMFLEET_METRICS_ADDR": "[::1]:9100"}).metrics_addr == ("::1", 9100)
    assert load_settings({"VMFLEET_METRICS_ADDR": "off"}).metrics_addr is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("VMFLEET_HYPERVISOR", "xen"),
        ("VMFLEET_SUBJECT_PREFIX", "a.b"),
        ("VMFLEET_HOST_ID", "host with spaces"),
        ("NATS_URL", "http://x"),
        ("JWT_SECRET", "short"),
        ("VMFLEET_REPLICAS", "0"),
        ("VMFLEET_SUBNET", "10.100.0.0"),
        ("VMFLEET_SUBNET", "10.100.0.1/16"),
        ("VMFLEET_SUBNET", "10.100.0.0/31"),
        ("VMFLEET_SUBNET", "fd00::/64"),
        ("VMFLEET_METRICS_ADDR", "9464"),
        ("VMFLEET_METRICS_ADDR", "localhost:9464"),
        ("VMFLEET_METRICS_ADDR", "127.0.0.1:0"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}:"):
        load_settings({name: value})


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        (
            "VMFLEET_HYPERVISOR",
            "xen",
            "VMFLEET_HYPERVISOR: 'xen' must be one of auto, qemu, cloud-hypervisor",
        ),
        # Read before the others (to log their errors), and refused the same way.
        (
            "VMFLEET_LOG_LEVEL",
            "chatty",
            "VMFLEET_LOG_LEVEL: 'CHATTY' must be one of DEBUG, INFO, WARNING, ERROR",
        ),
    ],
)
def test_cli_reports_bad_config_in_one_line(name: str, value: str, line: str) -> None:
    done = subprocess.run(
        [VMFLEET, "token"],
        env={name: value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"vmfleet: configuration error: {line}"]
