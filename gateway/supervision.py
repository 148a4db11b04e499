"""Checks of what the newer SDK adds to an instance: tags, its lifetime (``ttl`` /
``expires_at``), the restart policy (the health check: :mod:`gateway.health`), and the
supervision policies this build does not apply yet.

Every refusal is a 400 in hypeman's error shape that names the field, raised before
anything is sent: a client that set ``ttl: "1h"`` must never get a VM that silently
does not expire. The times are the gateway's; a ``ttl`` in a PATCH travels as seconds
and counts from when the owning worker commits it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Final

import msgspec
from msgspec import UNSET, UnsetType

from gateway.health import health_check, require_reachable_port
from gateway.requests import parse_duration
from schemas.api import UpdateInstanceRequest
from schemas.errors import BadRequest, Conflict
from schemas.messages import HealthCheckSpec, InstanceRecord, RestartPolicySpec, Update

__all__ = [
    "MAX_TAGS",
    "UPDATE_DECODER",
    "check_tags",
    "expiry_on_create",
    "expiry_update",
    "future_expiry",
    "plan_update",
    "refuse_unapplied",
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

#: Create/PATCH fields of hypeman 0.28 that vmfleet decodes but does not apply yet.
UNAPPLIED: Final = ("auto_standby",)
_RESTART_FIELDS: Final = frozenset({"policy", "backoff", "max_attempts", "stable_after"})


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


def refuse_unapplied(fields: dict[str, object]) -> None:
    """400 ``not_supported`` naming the first policy field that is set (null counts as
    not set): accepted and ignored, it would be the worst kind of silence."""
    for name in UNAPPLIED:
        value = fields.get(name, UNSET)
        if value is not UNSET and value is not None:
            raise BadRequest(
                f"{name} is not supported by this vmfleet build yet; leave it out",
                code="not_supported",
            )


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
    refuse_unapplied(given)
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
