"""Configuration from the environment, checked once at start-up.

Every variable is read here and nowhere else; a bad value stops start-up with one line
naming the variable, so an operator never has to guess which setting was wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas.sizes import parse_size

__all__ = ["ConfigError", "Settings", "default_data_dir", "load_settings"]

HYPERVISORS = ("auto", "qemu", "cloud-hypervisor")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(Exception):
    """A setting has a value vmfleet cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    nats_urls: tuple[str, ...]
    port: int
    jwt_secret: str | None
    data_dir: Path
    host_id: str
    hypervisor: str
    subject_prefix: str
    replicas: int
    assets_dir: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    insecure_registries: frozenset[str] = frozenset()
    log_max_bytes: int = 50 << 20
    network: str = "user"
    host_labels: dict[str, str] = field(default_factory=dict)
    publish_addr: str = "127.0.0.1"
    subnet: str = "10.100.0.0/16"


def default_data_dir(env: Mapping[str, str]) -> Path:
    """``/var/lib/vmfleet`` for root, else the XDG data home."""
    if os.geteuid() == 0:
        return Path("/var/lib/vmfleet")
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "vmfleet"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    return Settings(
        nats_urls=_nats_urls(env.get("NATS_URL", "nats://127.0.0.1:4222")),
        port=_port("PORT", env.get("PORT", "8080")),
        jwt_secret=_jwt_secret(env.get("JWT_SECRET")),
        data_dir=_data_dir(env),
        host_id=_nats_token("VMFLEET_HOST_ID", env.get("VMFLEET_HOST_ID") or _hostname()),
        hypervisor=_choice(
            "VMFLEET_HYPERVISOR", env.get("VMFLEET_HYPERVISOR", "auto"), HYPERVISORS
        ),
        subject_prefix=_nats_token(
            "VMFLEET_SUBJECT_PREFIX", env.get("VMFLEET_SUBJECT_PREFIX", "vmfleet")
        ),
        replicas=_int_in("VMFLEET_REPLICAS", env.get("VMFLEET_REPLICAS", "1"), 1, 5),
        assets_dir=Path(env["VMFLEET_ASSETS_DIR"]).expanduser()
        if env.get("VMFLEET_ASSETS_DIR")
        else None,
        kernel=_existing_file("VMFLEET_KERNEL", env.get("VMFLEET_KERNEL")),
        initrd=_existing_file("VMFLEET_INITRD", env.get("VMFLEET_INITRD")),
        host_labels=_labels("VMFLEET_HOST_LABELS", env.get("VMFLEET_HOST_LABELS", "")),
        network=_choice("VMFLEET_NETWORK", env.get("VMFLEET_NETWORK", "user"), ("user", "bridge")),
        publish_addr=_ip("VMFLEET_PUBLISH_ADDR", env.get("VMFLEET_PUBLISH_ADDR", "127.0.0.1")),
        subnet=_subnet("VMFLEET_SUBNET", env.get("VMFLEET_SUBNET", "10.100.0.0/16")),
        log_max_bytes=_size("VMFLEET_LOG_MAX_SIZE", env.get("VMFLEET_LOG_MAX_SIZE", "50MB")),
        insecure_registries=frozenset(
            r.strip() for r in env.get("VMFLEET_INSECURE_REGISTRIES", "").split(",") if r.strip()
        ),
    )


def _labels(name: str, raw: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not _TOKEN.match(key):
            raise ConfigError(f"{name}: {item!r} is not key=value (key: letters, digits, - or _)")
        labels[key] = value
    return labels


def _ip(name: str, raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not an IP address") from None


def _subnet(name: str, raw: str) -> str:
    """An IPv4 network with room for the gateway and at least one guest (a /30 or wider)."""
    try:
        network = ipaddress.IPv4Network(raw.strip(), strict=True)
    except ValueError as exc:
        raise ConfigError(
            f"{name}: {raw!r} is not an IPv4 network like 10.100.0.0/16 ({exc})"
        ) from None
    if network.prefixlen > 30:
        raise ConfigError(f"{name}: {raw!r} is too small (at most /30)")
    return str(network)


def _size(name: str, raw: str) -> int:
    try:
        value = parse_size(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a size like 50MB") from None
    if value < 1024:
        raise ConfigError(f"{name}: {raw!r} is too small (at least 1KB)")
    return value


def _existing_file(name: str, raw: str | None) -> Path | None:
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: {path} is not a file")
    return path


def _hostname() -> str:
    # A hostname may carry dots (FQDN); a host id is one NATS subject token.
    return socket.gethostname().split(".")[0] or "localhost"


def _nats_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    if not urls:
        raise ConfigError("NATS_URL: empty; give one or more nats:// URLs separated by commas")
    for url in urls:
        if not re.match(r"^(nats|tls|ws|wss)://[^\s/]+(:\d+)?/?$", url):
            raise ConfigError(f"NATS_URL: {url!r} is not a nats://host:port URL")
    return urls


def _port(name: str, raw: str) -> int:
    return _int_in(name, raw, 1, 65535)


def _int_in(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: {value} is out of range {low}..{high}")
    return value


def _jwt_secret(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if len(raw) < 16:
        raise ConfigError(
            "JWT_SECRET: too short; use at least 16 characters (32 random bytes is best)"
        )
    return raw


def _data_dir(env: Mapping[str, str]) -> Path:
    raw = env.get("VMFLEET_DATA_DIR")
    if not raw:
        return default_data_dir(env)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"VMFLEET_DATA_DIR: {path} exists and is not a directory")
    return path


def _nats_token(name: str, raw: str) -> str:
    if not _TOKEN.match(raw) or len(raw) > 64:
        raise ConfigError(
            f"{name}: {raw!r} must be 1-64 characters of letters, digits, '-' or '_' "
            "(it becomes part of NATS subject names)"
        )
    return raw


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise ConfigError(f"{name}: {raw!r} must be one of {', '.join(choices)}")
    return raw
