"""Configuration from the environment, checked once at start-up.

Every variable is read here and nowhere else; a bad value stops start-up with one line
naming the variable, so an operator never has to guess which setting was wrong.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas.messages import DEFAULT_CPU_OVERCOMMIT, DEFAULT_MEMORY_OVERCOMMIT
from schemas.sizes import parse_size

__all__ = ["ConfigError", "NatsClient", "Settings", "default_data_dir", "load_settings"]

HYPERVISORS = ("auto", "qemu", "cloud-hypervisor")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(Exception):
    """A setting has a value vmfleet cannot use; the message names the variable."""


@dataclass(frozen=True)
class NatsClient:
    """How the daemons prove who they are to NATS, and how they check its TLS certificate
    (docs/security.md). At most one of ``creds``, ``user`` (with ``password``), ``token``."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


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
    ch_binary: Path | None = None
    #: VMFLEET_AGENT_BINARY: the guest agent put into the initrd (None: the repo's build).
    agent_binary: Path | None = None
    insecure_registries: frozenset[str] = frozenset()
    log_max_bytes: int = 50 << 20
    transfer_cache_bytes: int = 20 << 30
    #: VMFLEET_TEMPLATES / VMFLEET_TEMPLATES_DISK: warm templates and their disk budget.
    templates: bool = True
    templates_disk_bytes: int = 4 << 30
    network: str = "user"
    host_labels: dict[str, str] = field(default_factory=dict)
    publish_addr: str = "127.0.0.1"
    subnet: str = "10.100.0.0/16"
    cpu_overcommit: float = DEFAULT_CPU_OVERCOMMIT
    memory_overcommit: float = DEFAULT_MEMORY_OVERCOMMIT
    ui: bool = False
    #: ``vmfleet worker``'s own /metrics listener (host, port); None: not served.
    metrics_addr: tuple[str, int] | None = ("0.0.0.0", 9464)
    #: NATS_USER / NATS_PASSWORD / NATS_TOKEN / NATS_CREDS / NATS_TLS_*.
    nats: NatsClient = field(default_factory=NatsClient)


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
        nats=_nats_client(env),
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
        ch_binary=_executable("VMFLEET_CH_BINARY", env.get("VMFLEET_CH_BINARY")),
        agent_binary=Path(env["VMFLEET_AGENT_BINARY"]).expanduser()
        if env.get("VMFLEET_AGENT_BINARY")
        else None,
        host_labels=_labels("VMFLEET_HOST_LABELS", env.get("VMFLEET_HOST_LABELS", "")),
        network=_choice("VMFLEET_NETWORK", env.get("VMFLEET_NETWORK", "user"), ("user", "bridge")),
        publish_addr=_ip("VMFLEET_PUBLISH_ADDR", env.get("VMFLEET_PUBLISH_ADDR", "127.0.0.1")),
        subnet=_subnet("VMFLEET_SUBNET", env.get("VMFLEET_SUBNET", "10.100.0.0/16")),
        log_max_bytes=_size("VMFLEET_LOG_MAX_SIZE", env.get("VMFLEET_LOG_MAX_SIZE", "50MB")),
        transfer_cache_bytes=_size(
            "VMFLEET_TRANSFER_CACHE_SIZE", env.get("VMFLEET_TRANSFER_CACHE_SIZE", "20GB")
        ),
        templates=_flag("VMFLEET_TEMPLATES", env.get("VMFLEET_TEMPLATES", "on")),
        templates_disk_bytes=_size(
            "VMFLEET_TEMPLATES_DISK", env.get("VMFLEET_TEMPLATES_DISK", "4GB")
        ),
        cpu_overcommit=_ratio(
            "VMFLEET_CPU_OVERCOMMIT",
            env.get("VMFLEET_CPU_OVERCOMMIT", f"{DEFAULT_CPU_OVERCOMMIT:g}"),
        ),
        memory_overcommit=_ratio(
            "VMFLEET_MEMORY_OVERCOMMIT",
            env.get("VMFLEET_MEMORY_OVERCOMMIT", f"{DEFAULT_MEMORY_OVERCOMMIT:g}"),
        ),
        ui=_flag("VMFLEET_UI", env.get("VMFLEET_UI", "")),
        metrics_addr=_listen_addr(
            "VMFLEET_METRICS_ADDR", env.get("VMFLEET_METRICS_ADDR", "0.0.0.0:9464")
        ),
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


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ConfigError(f"{name}: {raw!r} must be 1 or 0 (true/false, yes/no, on/off)")
    return value in _TRUE


def _listen_addr(name: str, raw: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::]:9464`` for IPv6), or ``off``."""
    if raw.strip().lower() in ("off", "none", ""):
        return None
    host, sep, port = raw.strip().rpartition(":")
    if not sep:
        raise ConfigError(f"{name}: {raw!r} is not HOST:PORT (or off)")
    return _ip(name, host.strip("[]")), _port(name, port)


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


def _ratio(name: str, raw: str) -> float:
    """An overcommit ratio: a number above 0 (below 1 keeps part of the host back), at most
    100."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number like 4 or 1.5") from None
    if not 0 < value <= 100:  # also refuses nan
        raise ConfigError(f"{name}: {raw!r} is out of range (above 0, at most 100)")
    return value


def _existing_file(name: str, raw: str | None) -> Path | None:
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: {path} is not a file")
    return path


def _executable(name: str, raw: str | None) -> Path | None:
    path = _existing_file(name, raw)
    if path is not None and not os.access(path, os.X_OK):
        raise ConfigError(f"{name}: {path} is not executable")
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


def _nats_client(env: Mapping[str, str]) -> NatsClient:
    """NATS credentials (one kind at most) and TLS files, each checked to be usable."""
    user, password, token = env.get("NATS_USER"), env.get("NATS_PASSWORD"), env.get("NATS_TOKEN")
    creds = _existing_file("NATS_CREDS", env.get("NATS_CREDS"))
    if user and not password:
        raise ConfigError("NATS_PASSWORD: required with NATS_USER")
    if password and not user:
        raise ConfigError("NATS_USER: required with NATS_PASSWORD")
    kinds = [name for name, value in (("NATS_CREDS", creds), ("NATS_USER", user)) if value]
    kinds += ["NATS_TOKEN"] if token else []
    if len(kinds) > 1:
        raise ConfigError(
            f"{kinds[-1]}: set only one of NATS_CREDS, NATS_USER (with NATS_PASSWORD) or "
            f"NATS_TOKEN (also set: {', '.join(kinds[:-1])})"
        )
    if creds is not None and importlib.util.find_spec("nkeys") is None:
        raise ConfigError("NATS_CREDS: needs the Python package nkeys (pip install nkeys)")
    tls_ca = _existing_file("NATS_TLS_CA", env.get("NATS_TLS_CA"))
    tls_cert = _existing_file("NATS_TLS_CERT", env.get("NATS_TLS_CERT"))
    tls_key = _existing_file("NATS_TLS_KEY", env.get("NATS_TLS_KEY"))
    if (tls_cert is None) != (tls_key is None):
        missing = "NATS_TLS_KEY" if tls_key is None else "NATS_TLS_CERT"
        raise ConfigError(f"{missing}: required with {_other_tls(missing)}")
    _check_tls(tls_ca, tls_cert, tls_key)
    return NatsClient(
        user=user or None,
        password=password or None,
        token=token or None,
        creds=creds,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


def _other_tls(name: str) -> str:
    return "NATS_TLS_CERT" if name == "NATS_TLS_KEY" else "NATS_TLS_KEY"


def _check_tls(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """Load the files as the connection will, so a wrong one is reported now, by name."""
    if ca is not None:
        try:
            ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"NATS_TLS_CA: {ca} is not a PEM CA certificate ({exc})") from None
    if cert is not None and key is not None:
        try:
            ssl.create_default_context().load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"NATS_TLS_CERT: {cert} with NATS_TLS_KEY {key} is not a PEM certificate and "
                f"its private key ({exc})"
            ) from None
