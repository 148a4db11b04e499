"""Checking a ``health_check`` as hypeman 0.28 defines it, before anything is sent.

The type is ``none``, ``http``, ``tcp`` or ``exec``; left out, it is inferred from the one
sub-object given (none given: ``none``, stored as no check). Defaults are hypeman's:
interval 10s, timeout 2s (at most the interval), start_period 30s, thresholds 3 and 1.
Every refusal is 400 ``invalid_health_check`` naming the field.

http and tcp checks probe the guest's network. On a bridge-mode host the worker reaches
the guest's address; in user mode (QEMU's own network stack) the host has no route to
the guest and probes through the instance's host port mapping of the checked guest
port, so in user mode such a check needs that mapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec
from msgspec import UNSET

from gateway.requests import parse_duration
from schemas.api import PortMapping
from schemas.errors import BadRequest
from schemas.messages import HealthCheckSpec

__all__ = ["health_check", "require_reachable_port"]

_FIELDS: Final = frozenset(
    {
        "type",
        "http",
        "tcp",
        "exec",
        "interval",
        "timeout",
        "start_period",
        "failure_threshold",
        "success_threshold",
    }
)
_PROBES: Final = ("http", "tcp", "exec")
_SUB_FIELDS: Final = {
    "http": frozenset({"port", "path", "scheme", "expected_status"}),
    "tcp": frozenset({"port"}),
    "exec": frozenset({"command", "working_dir"}),
}
#: Go's longest duration, about 292 years.
_MAX_DURATION_S: Final = float((1 << 63) - 1) / 1e9


def health_check(raw: object, *, network_enabled: bool) -> HealthCheckSpec | None:
    """A checked ``health_check`` (None: no check), or 400 ``invalid_health_check``."""
    if raw is None or raw is UNSET:
        return None
    if not isinstance(raw, dict):
        raise _bad("health_check", "it must be an object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _bad(f"health_check.{unknown[0]}", "unknown field")
    kind = _probe_type(raw)
    interval = _duration(raw, "interval", "10s", positive=True)
    timeout = _duration(raw, "timeout", "2s", positive=True)
    if timeout > interval:
        raise _bad("health_check.timeout", "it must not be longer than the interval")
    timing = HealthCheckSpec(
        type="exec",
        interval_s=interval,
        timeout_s=timeout,
        start_period_s=_duration(raw, "start_period", "30s", positive=False),
        failure_threshold=_threshold(raw, "failure_threshold", 3),
        success_threshold=_threshold(raw, "success_threshold", 1),
    )
    if kind == "none":
        return None
    sub = _sub_object(raw, kind)
    if kind == "exec":
        return msgspec.structs.replace(timing, **_exec(sub))
    if not network_enabled:
        raise _bad(f"health_check.{kind}", "an http or tcp check needs network.enabled")
    port = _port(sub, kind)
    if kind == "tcp":
        return msgspec.structs.replace(timing, type="tcp", port=port)
    return msgspec.structs.replace(timing, type="http", port=port, **_http(sub))


def require_reachable_port(
    check: HealthCheckSpec | None, port_mappings: Iterable[PortMapping], *, user_mode: bool
) -> None:
    """In user mode an http/tcp check is probed through the host port mapped to its guest
    port: 400 naming the field when the instance maps none."""
    if check is None or check.type == "exec" or not user_mode:
        return
    mapped = any(m.guest_port == check.port and m.protocol == "tcp" for m in port_mappings)
    if not mapped:
        raise _bad(
            f"health_check.{check.type}.port",
            f"guest port {check.port} has no tcp port_mapping, and in the user network mode "
            "this host runs a check reaches the guest only through one: add "
            f'{{"guest_port": {check.port}, "host_port": ...}} to port_mappings',
        )


def _probe_type(raw: dict[str, object]) -> str:
    given = [name for name in _PROBES if raw.get(name) is not None]
    kind = raw.get("type")
    if kind is None or kind == "":
        if len(given) > 1:
            raise _bad("health_check.type", f"set it: several probes given ({', '.join(given)})")
        return given[0] if given else "none"
    if kind not in ("none", *_PROBES):
        raise _bad("health_check.type", f"must be none, http, tcp or exec, not {kind!r}")
    extra = [name for name in given if name != kind]
    if extra:
        raise _bad(f"health_check.{extra[0]}", f"does not match type {kind!r}")
    return str(kind)


def _sub_object(raw: dict[str, object], kind: str) -> dict[str, object]:
    sub = raw.get(kind)
    if sub is None:
        raise _bad(f"health_check.{kind}", f"type {kind} needs its {kind} object")
    if not isinstance(sub, dict):
        raise _bad(f"health_check.{kind}", "it must be an object")
    unknown = sorted(set(sub) - _SUB_FIELDS[kind])
    if unknown:
        raise _bad(f"health_check.{kind}.{unknown[0]}", "unknown field")
    return sub


def _port(sub: dict[str, object], kind: str) -> int:
    port = sub.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _bad(f"health_check.{kind}.port", f"must be a port 1-65535, not {port!r}")
    return port


def _http(sub: dict[str, object]) -> dict[str, object]:
    path = sub.get("path") or "/"
    if not isinstance(path, str) or not path.startswith("/"):
        raise _bad("health_check.http.path", f"must start with /, not {path!r}")
    scheme = sub.get("scheme") or "http"
    if scheme not in ("http", "https"):
        raise _bad("health_check.http.scheme", f"must be http or https, not {scheme!r}")
    status = sub.get("expected_status")
    if status is None:
        status = 200
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise _bad("health_check.http.expected_status", f"must be 100-599, not {status!r}")
    return {"path": path, "scheme": scheme, "expected_status": status}


def _exec(sub: dict[str, object]) -> dict[str, object]:
    command = sub.get("command")
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(arg, str) for arg in command)
        or not command[0]
    ):
        raise _bad("health_check.exec.command", "must be a non-empty list of strings")
    working_dir = sub.get("working_dir") or ""
    if not isinstance(working_dir, str):
        raise _bad("health_check.exec.working_dir", "must be a string")
    return {"command": list(command), "working_dir": working_dir}


def _duration(raw: dict[str, object], name: str, default: str, *, positive: bool) -> float:
    value = raw.get(name)
    text = default if value is None or value == "" else value
    field = f"health_check.{name}"
    if not isinstance(text, str):
        raise _bad(field, f'must be a duration such as "10s", not {text!r}')
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise _bad(field, f'must be a duration such as "10s", not {text!r}') from None
    if (positive and seconds <= 0) or seconds < 0 or seconds > _MAX_DURATION_S:
        raise _bad(field, f"must be {'positive' if positive else '0 or more'}, not {text!r}")
    return seconds


def _threshold(raw: dict[str, object], name: str, default: int) -> int:
    value = raw.get(name)
    if value is None or value == 0:
        # hypeman fills a zero threshold with its default, as Go's zero value.
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"health_check.{name}", f"must be a whole number >= 1, not {value!r}")
    return value


def _bad(field: str, message: str) -> BadRequest:
    return BadRequest(f"invalid {field}: {message}", code="invalid_health_check")
