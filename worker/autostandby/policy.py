"""What an instance's policy and idle clock say, as pure functions of its record and of what
the controller observed: the status hypeman defines, when the next standby is due, and
whether an idle standby may still go ahead (the standby operation asks that once it holds
the instance's lock, so a connection or a hold that came meanwhile wins).

The idle clock is ``record.idle.idle_since``. A start or a restore begins the clock again
(``started_at``), so a time stored before the VM stopped or slept never counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.api import InstanceState, go_duration
from schemas.autostandby import AutoStandbyStatus, StatusName, StatusReason
from schemas.errors import Conflict
from schemas.messages import InstanceRecord

__all__ = [
    "IdleStandbyCancelled",
    "Observation",
    "idle_standby_refusal",
    "idle_start",
    "ineligibility",
    "next_standby_at",
    "policy_enabled",
    "status_of",
]


@dataclass(frozen=True)
class Observation:
    """What the controller knows of one instance beyond its record."""

    connections: int = 0
    #: Why the kernel's table could not be read (None: it was).
    observer_error: str | None = None
    #: An idle standby is queued (sent, not yet begun under the instance's lock).
    standby_requested: bool = False
    tracking_mode: str = ""
    last_activity_at: datetime | None = None


class IdleStandbyCancelled(Conflict):
    """An idle standby found, once under the instance's lock, that it no longer applies."""

    code = "standby_cancelled"


def check_idle_standby(record: InstanceRecord, now: datetime, *, in_session: bool = False) -> None:
    """Raise :class:`IdleStandbyCancelled` unless an idle standby may go ahead now (never
    while an exec or cp session is open)."""
    refusal = "an exec or cp session is open" if in_session else idle_standby_refusal(record, now)
    if refusal is not None:
        raise IdleStandbyCancelled(f"idle standby of {record.id} cancelled: {refusal}")


def policy_enabled(record: InstanceRecord) -> bool:
    return record.auto_standby is not None and record.auto_standby.enabled


def idle_start(record: InstanceRecord) -> datetime | None:
    """Since when the running instance has been idle (None: it is not, as far as known)."""
    since = record.idle.idle_since
    if since is None:
        return None
    started = record.started_at
    return max(since, started) if started is not None else since


def next_standby_at(record: InstanceRecord) -> datetime | None:
    """When the policy puts the instance in standby if it stays idle (a hold postpones it)."""
    start = idle_start(record)
    policy = record.auto_standby
    if start is None or policy is None or not policy.enabled:
        return None
    due = start + timedelta(seconds=policy.idle_timeout_s)
    hold = record.idle.hold_until
    return max(due, hold) if hold is not None else due


def ineligibility(record: InstanceRecord) -> StatusReason | None:
    """hypeman's reason a running-policy instance cannot go to standby now, if any."""
    if record.state is not InstanceState.RUNNING:
        return "instance_not_running"
    if not record.network_enabled:
        return "network_disabled"
    if record.ip is None:
        return "missing_ip"
    return None


def idle_standby_refusal(record: InstanceRecord, now: datetime) -> str | None:
    """Why an idle standby must not happen now (None: it may)."""
    if not policy_enabled(record):
        return "the auto-standby policy is no longer enabled"
    reason = ineligibility(record)
    if reason is not None:
        return f"the instance is not eligible ({reason})"
    due = next_standby_at(record)
    if due is None:
        return "an inbound connection arrived"
    if due > now:
        return f"it is not due before {due.isoformat()}"
    return None


def status_of(record: InstanceRecord, seen: Observation, now: datetime) -> AutoStandbyStatus:
    """hypeman's AutoStandbyStatus: the first matching row of its table decides."""
    policy = record.auto_standby
    status, reason = _row(record, seen, now)
    out = AutoStandbyStatus(
        active_inbound_connections=seen.connections,
        configured=policy is not None,
        enabled=policy_enabled(record),
        eligible=status not in ("disabled", "ineligible", "unsupported"),
        reason=reason,
        status=status,
        supported=True,
        tracking_mode=seen.tracking_mode,
    )
    if policy is not None and policy.enabled:
        out.idle_timeout = policy.idle_timeout
    hold = record.idle.hold_until
    if hold is not None and hold > now:
        out.hold_until = hold
    last = seen.last_activity_at or record.idle.last_inbound_activity_at
    if last is not None:
        out.last_inbound_activity_at = last
    if status in ("idle_countdown", "ready_for_standby", "standby_requested"):
        _countdown(record, now, out)
    return out


def _row(
    record: InstanceRecord, seen: Observation, now: datetime
) -> tuple[StatusName, StatusReason]:
    policy = record.auto_standby
    if policy is None:
        return "disabled", "policy_missing"
    if not policy.enabled:
        return "disabled", "policy_disabled"
    reason = ineligibility(record)
    if reason is not None:
        return "ineligible", reason
    if seen.standby_requested:
        return "standby_requested", "ready_for_standby"
    if seen.observer_error is not None:
        return "error", "observer_error"
    if seen.connections > 0:
        return "active", "active_inbound_connections"
    due = next_standby_at(record)
    if due is not None and due <= now:
        return "ready_for_standby", "ready_for_standby"
    return "idle_countdown", "idle_timeout_not_elapsed"


def _countdown(record: InstanceRecord, now: datetime, out: AutoStandbyStatus) -> None:
    start = idle_start(record)
    due = next_standby_at(record)
    if start is None or due is None:
        return  # idle since this tick: the controller has not stamped the clock yet
    out.idle_since = start
    out.next_standby_at = due
    out.countdown_remaining = go_duration(round(max(0.0, (due - now).total_seconds())))
