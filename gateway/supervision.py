"""Checks of what the newer SDK adds to an instance: tags, its lifetime (``ttl`` /
``expires_at``), the restart policy, the auto-standby policy (the health check:
:mod:`gateway.health`).

Every refusal is a 400 in hypeman's error shape that names the field, raised before
anything is sent: a client that set ``ttl: "1h"`` must never get a VM that silently
does not expire. The times are the gateway's; a ``ttl`` in a PATCH travels as seconds
and counts from when the owning worker commits it.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime, timedelta
from typing import Final

import msgspec
from msgspec import UNSET, UnsetType

from gateway.health import health_check, require_reachable_port
from gateway.requests import parse_duration
from schemas.api import UpdateInstanceRequest, go_duration
from schemas.autostandby import AutoStandbySpec
from schemas.errors import BadRequest, Conflict
from schemas.messages import HealthCheckSpec, InstanceRecord, RestartPolicySpec, Update

__all__ = [
    "MAX_TAGS",
    "UPDATE_DECODER",
    "auto_standby_policy",
    "check_tags",
    "expiry_on_create",
    "expiry_update",
    "future_expiry",
    "plan_update",
    "restart_policy",
    "ttl_seconds",
]

MAX_TAGS: Final = 50
MAX_TAG_KEY: Final = 63
MAX_TAG_VALUE: Final = 255
#: Keys travel in query strings as ``tags[key]=value``: no brackets, ``=``, ``&`` or spaces.
TAG_KEY_PATTERN: Final = r"[A-Za-z0-9]([A-Za-z0-9._:/-]*[A-Za-z0-9])?"
#: Go's longest duration (about 292 years): a ttl beyond it is not one hypeman accepts.
_MAX_TTL_S: Final = float((1 << 63) - 1) / 1e9

_RESTART_FIELDS: Final = frozenset({"policy", "backoff", "max_attempts", "stable_after"})
_AUTO_STANDBY_FIELDS: Final = frozenset(
    {"enabled", "idle_timeout", "ignore_destination_ports", "ignore_source_cidrs"}
)


def check_tags(tags: dict[str, str]) -> dict[str, str]:
    """The tags, or 400 ``invalid_tags`` naming the first bad one."""
    if len(tags) > MAX_TAGS:
        raise _bad_tags(f"at most {MAX_TAGS} tags per instance, got {len(tags)}")
    for key, value in tags.items():
        if len(key) > MAX_TAG_KEY or re.fullmatch(TAG_KEY_PATTERN, key) is None:
            raise _bad_tags(
                f"tag key {key!r} must be 1-{MAX_TAG_KEY} letters, digits and '.', '_', ':', "
                "'/', '-', beginning and ending with a letter or digit"
            )
        if len(value) > MAX_TAG_VALUE or not value.isprintable():
            raise _bad_tags(
                f"tag {key!r}: the value must be at most {MAX_TAG_VALUE} printable characters"
            )
    return tags


def _bad_tags(message: str) -> BadRequest:
    return BadRequest(f"invalid tags: {message}", code="invalid_tags")


def ttl_seconds(text: str) -> float:
    """A ttl's seconds (0: no expiry); 400 ``invalid_ttl`` for a malformed or negative
    one. Go durations, as hypeman takes them (``"90s"``, ``"1h30m"``, ``"0s"``)."""
    sign, digits = (text[0], text[1:]) if text[:1] in ("-", "+") else ("", text)
    try:
        seconds = parse_duration(digits)
    except ValueError:
        raise BadRequest(
            f'invalid ttl {text!r}: expected a duration such as "30s", "1h" or "0s"',
            code="invalid_ttl",
        ) from None
    if sign == "-" and seconds > 0:
        raise BadRequest(f"invalid ttl {text!r}: it must not be negative", code="invalid_ttl")
    if seconds > _MAX_TTL_S:
        raise BadRequest(f"invalid ttl {text!r}: longer than 292 years", code="invalid_ttl")
    return seconds


def expiry_on_create(
    ttl: str | UnsetType, expires_at: datetime | UnsetType, now: datetime
) -> datetime | None:
    """When the instance created ``now`` expires (None: never)."""
    if ttl is not UNSET and expires_at is not UNSET:
        raise _both()
    if isinstance(ttl, str):
        seconds = ttl_seconds(ttl)
        return now + timedelta(seconds=seconds) if seconds > 0 else None
    if isinstance(expires_at, datetime):
        return future_expiry(expires_at, now)
    return None


def expiry_update(
    ttl: str | UnsetType, expires_at: datetime | UnsetType, now: datetime
) -> tuple[float | None, datetime | None]:
    """What a PATCH asks of the expiry: ``(ttl seconds, None)`` (0 clears it; the worker
    counts from its commit), ``(None, expires_at)``, or ``(None, None)`` to keep it."""
    if ttl is not UNSET and expires_at is not UNSET:
        raise _both()
    if isinstance(ttl, str):
        return ttl_seconds(ttl), None
    if isinstance(expires_at, datetime):
        return None, future_expiry(expires_at, now)
    return None, None


def future_expiry(expires_at: datetime, now: datetime) -> datetime:
    if expires_at <= now:
        raise BadRequest(
            f"expires_at {expires_at.isoformat()} is not in the future",
            code="invalid_expires_at",
        )
    return expires_at


def _both() -> BadRequest:
    return BadRequest(
        "ttl and expires_at are mutually exclusive: send one of them", code="invalid_ttl"
    )


def restart_policy(raw: object) -> RestartPolicySpec | None:
    """A checked ``restart_policy`` (None: ``never``, hypeman's default, stored as no
    policy), or 400 ``invalid_restart_policy`` naming what is wrong."""
    if raw is None or raw is UNSET:
        return None
    if not isinstance(raw, dict):
        raise _bad_policy("it must be an object")
    unknown = sorted(set(raw) - _RESTART_FIELDS)
    if unknown:
        raise _bad_policy(f"unknown field {unknown[0]!r}")
    policy = raw.get("policy") or "never"
    if policy not in ("never", "always", "on_failure"):
        raise _bad_policy(f"policy must be never, always or on_failure, not {policy!r}")
    max_attempts = raw.get("max_attempts", 0)
    if max_attempts is None:
        max_attempts = 0
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 0:
        raise _bad_policy(f"max_attempts must be a whole number >= 0, not {max_attempts!r}")
    backoff = _positive_duration(raw, "backoff", "5s")
    stable_after = _positive_duration(raw, "stable_after", "10m")
    if policy == "never":
        return None
    return RestartPolicySpec(
        policy="always" if policy == "always" else "on_failure",
        backoff_s=backoff,
        max_attempts=max_attempts,
        stable_after_s=stable_after,
    )


def _positive_duration(raw: dict[str, object], name: str, default: str) -> float:
    value = raw.get(name)
    text = default if value is None or value == "" else value
    if not isinstance(text, str):
        raise _bad_policy(f'{name} must be a duration such as "5s", not {text!r}')
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise _bad_policy(f'{name} must be a duration such as "5s", not {text!r}') from None
    if seconds <= 0 or seconds > _MAX_TTL_S:
        raise _bad_policy(f"{name} must be positive, not {text!r}")
    return seconds


def _bad_policy(message: str) -> BadRequest:
    return BadRequest(f"invalid restart_policy: {message}", code="invalid_restart_policy")


def auto_standby_policy(raw: object) -> AutoStandbySpec | None:
    """A checked, normalized ``auto_standby`` (None: no policy), or 400
    ``invalid_auto_standby`` naming what is wrong. As hypeman: ``idle_timeout`` is required
    and positive when enabled and echoed as Go prints it; CIDRs canonical, sorted and
    unique; ports sorted and unique, 0 refused; a disabled policy keeps nothing else."""
    if raw is None or raw is UNSET:
        return None
    if not isinstance(raw, dict):
        raise _bad_standby("it must be an object")
    unknown = sorted(set(raw) - _AUTO_STANDBY_FIELDS)
    if unknown:
        raise _bad_standby(f"unknown field {unknown[0]!r}")
    enabled = raw.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise _bad_standby(f"enabled must be true or false, not {enabled!r}")
    # Everything given is checked, even in a disabled policy: nothing wrong is stored.
    timeout_s = _idle_timeout(raw.get("idle_timeout"), required=bool(enabled))
    ports = _ignored_ports(raw.get("ignore_destination_ports"))
    cidrs = _ignored_cidrs(raw.get("ignore_source_cidrs"))
    if not enabled:
        return AutoStandbySpec(enabled=False)
    return AutoStandbySpec(
        enabled=True,
        idle_timeout=go_duration(timeout_s),
        idle_timeout_s=timeout_s,
        ignore_destination_ports=ports,
        ignore_source_cidrs=cidrs,
    )


def _idle_timeout(value: object, *, required: bool) -> float:
    if value is None or value == "":
        if required:
            raise _bad_standby('idle_timeout is required when enabled (e.g. "5m")')
        return 0.0
    if not isinstance(value, str):
        raise _bad_standby(f'idle_timeout must be a duration such as "5m", not {value!r}')
    if value.startswith("-"):
        raise _bad_standby(f"idle_timeout must be positive, not {value!r}")
    try:
        # Go's ParseDuration: a number needs its unit ("30" alone is refused).
        if re.fullmatch(r"[0-9.]+", value):
            raise ValueError(value)
        seconds = parse_duration(value)
    except ValueError:
        raise _bad_standby(
            f'idle_timeout must be a duration such as "30s" or "5m", not {value!r}'
        ) from None
    if seconds <= 0 or seconds > _MAX_TTL_S:
        raise _bad_standby(f"idle_timeout must be positive, not {value!r}")
    return seconds


def _ignored_ports(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad_standby("ignore_destination_ports must be a list of port numbers")
    for port in value:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _bad_standby(f"ignore_destination_ports: {port!r} is not a port (1-65535)")
    return tuple(sorted(set(value)))


def _ignored_cidrs(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad_standby("ignore_source_cidrs must be a list of CIDRs")
    networks: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for cidr in value:
        # Go's ParseCIDR: an address alone is not a CIDR; host bits are masked off.
        try:
            if not isinstance(cidr, str) or "/" not in cidr:
                raise ValueError
            networks.add(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise _bad_standby(
                f'ignore_source_cidrs: {cidr!r} is not a CIDR such as "10.0.0.0/8"'
            ) from None
    return tuple(sorted(str(network) for network in networks))


def _bad_standby(message: str) -> BadRequest:
    return BadRequest(f"invalid auto_standby: {message}", code="invalid_auto_standby")


def plan_update(
    req: UpdateInstanceRequest,
    record: InstanceRecord,
    *,
    command_id: str,
    now: datetime,
    user_mode: bool = False,
) -> Update:
    """The Update command of a PATCH, or the 400/409 that refuses it (``user_mode``: the
    instance's host networks in user mode, where http/tcp checks need a port mapping)."""
    given = {
        name: value for name in req.__struct_fields__ if (value := getattr(req, name)) is not UNSET
    }
    if not given:
        raise BadRequest(
            "request body has no field to update (auto_standby, env, expires_at, "
            "health_check, restart_policy, ttl)",
            code="Bad Request",
        )
    standby = UNSET if req.auto_standby is UNSET else auto_standby_policy(req.auto_standby)
    if req.env:
        raise BadRequest(
            "env: only keys bound to a credential's source.env can be updated, and vmfleet "
            "instances have no credential bindings; create the instance again to change its "
            "environment",
            code="invalid_env",
        )
    if record.expired(now):
        raise Conflict(
            f"instance {record.id} has expired and is being deleted; it can no longer be updated",
            code="instance_expired",
        )
    ttl_s, expires_at = expiry_update(req.ttl, req.expires_at, now)
    policy = UNSET if req.restart_policy is UNSET else restart_policy(req.restart_policy)
    check = _health_update(req.health_check, record, user_mode=user_mode)
    return Update(
        id=command_id,
        instance_id=record.id,
        issued_at=now,
        ttl_s=ttl_s,
        expires_at=expires_at,
        restart_policy=policy,
        health_check=check,
        auto_standby=standby,
    )


def _health_update(
    raw: object, record: InstanceRecord, *, user_mode: bool
) -> HealthCheckSpec | UnsetType | None:
    """A PATCH's health check replaces the stored one whole (null or type none: none)."""
    if raw is UNSET:
        return UNSET
    check = health_check(raw, network_enabled=record.network_enabled)
    require_reachable_port(check, record.port_mappings, user_mode=user_mode)
    return check


#: PATCH bodies: an unknown field is a 400 naming it (the struct forbids them).
UPDATE_DECODER: Final = msgspec.json.Decoder(UpdateInstanceRequest)
