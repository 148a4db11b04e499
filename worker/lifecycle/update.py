"""update (``PATCH /instances/{id}``): what changes in the record without touching the VM.

Today that is the expiry, the restart policy, the health check (a new check opens a
fresh health window) and the auto-standby policy (the idle clock keeps running). A
``ttl`` counts from here, when the owning worker commits it, not from when a gateway
received it; an instance past its deadline is refused (it is about to be deleted by
:mod:`worker.expiry`, and a new lease must not race the reaper).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec
from msgspec import UNSET

from schemas.api import InstanceState
from schemas.autostandby import AutoStandbySpec
from schemas.clock import utc_now
from schemas.errors import BadRequest, Conflict
from schemas.messages import HealthCheckSpec, HealthState, RestartPolicySpec, RestartState, Update
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.exits import after_exit, ended_on_its_own, note_decision
from worker.states import Op, check_transition

__all__ = ["InstanceExpired", "update"]


class InstanceExpired(Conflict):
    code = "instance_expired"


async def update(ctx: OpContext, inst: LocalInstance, cmd: Update) -> None:
    check_transition(Op.UPDATE, inst.state)
    now = utc_now()
    if inst.record.expired(now):
        raise InstanceExpired(
            f"instance {inst.id} expired at {inst.record.expires_at:%Y-%m-%dT%H:%M:%SZ} and "
            "is being deleted; it can no longer be updated"
        )
    _update_expiry(ctx, inst, cmd, now)
    if cmd.restart_policy is not UNSET:
        _update_restart_policy(ctx, inst, cmd.restart_policy, now)
    if cmd.health_check is not UNSET:
        _update_health_check(ctx, inst, cmd.health_check, now)
    if cmd.auto_standby is not UNSET:
        _update_auto_standby(ctx, inst, cmd.auto_standby)


def _update_expiry(ctx: OpContext, inst: LocalInstance, cmd: Update, now: datetime) -> None:
    if cmd.ttl_s is not None:
        expires_at = now + timedelta(seconds=cmd.ttl_s) if cmd.ttl_s > 0 else None
    elif cmd.expires_at is not None:
        if cmd.expires_at <= now:
            raise BadRequest("expires_at must be in the future", code="invalid_expires_at")
        expires_at = cmd.expires_at
    else:
        return
    ctx.save(inst, expires_at=expires_at)
    ctx.oplog(inst, "expiry updated", expires_at=expires_at.isoformat() if expires_at else "never")


def _update_restart_policy(
    ctx: OpContext, inst: LocalInstance, policy: RestartPolicySpec | None, now: datetime
) -> None:
    """The new policy replaces the old one whole; the counters start again, unless the
    instance was stopped by its user (that block holds until the next start).

    On an instance already Stopped because its program ended by itself, the new policy
    also judges that end, as hypeman's restart controller does (it looks at every Stopped
    instance with a policy, not only at fresh exits): ``always``, or ``on_failure`` after a
    failure, schedules a restart ``backoff`` from now. A user's stop is never undone."""
    record = inst.record
    status = record.restart
    if status.blocked_reason != "manual_stop":
        status = RestartState()
    decided = record.state is InstanceState.STOPPED and ended_on_its_own(record)
    if decided:
        judged = msgspec.structs.replace(record, restart_policy=policy, restart=status)
        status = after_exit(judged, record.exit_code, now)
    ctx.save(inst, restart_policy=policy, restart=status)
    ctx.oplog(inst, "restart policy updated", policy=policy.policy if policy else "never")
    if decided:
        note_decision(ctx, inst, status)


def _update_health_check(
    ctx: OpContext, inst: LocalInstance, check: HealthCheckSpec | None, now: datetime
) -> None:
    """The new check replaces the old one whole and starts a fresh window."""
    ctx.save(inst, health_check=check, health=HealthState(window_started_at=now))
    ctx.oplog(inst, "health check updated", type=check.type if check else "none")


def _update_auto_standby(
    ctx: OpContext, inst: LocalInstance, policy: AutoStandbySpec | None
) -> None:
    """The new policy replaces the old one whole; how long the instance has been idle is a
    fact about its traffic, not its policy, so the idle clock and any hold stay."""
    ctx.save(inst, auto_standby=policy)
    enabled = policy is not None and policy.enabled
    ctx.oplog(
        inst,
        "auto-standby policy updated",
        idle_timeout=policy.idle_timeout if policy and enabled else "disabled",
    )
