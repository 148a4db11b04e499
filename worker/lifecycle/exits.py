"""How an instance's VM ended on its own, and what its restart policy decides about it.

When the app exits, the guest's init writes ``HYPEMAN-EXIT code=N message="..."`` to the
console (the app log) and powers off; the VMM exits right after. The host reads the
marker from the app log's tail when it records that exit: the file outlives the VMM, so
nothing has to be asked of a guest that is already gone. A VMM that exits without a
marker (a crash, a kill, a kernel panic) is the crash path: Stopped with a state_error.

The restart decision is taken in the same record write as the Stopped state, so that it
is as durable as the state itself: ``restart.next_attempt_at`` is the schedule that
:mod:`worker.supervisor` carries out, also after the worker itself restarted.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import InstanceRecord, RestartState
from worker.lifecycle.context import LocalInstance, OpContext
from worker.states import Event

__all__ = [
    "BOOT_MARKER",
    "RESTART_COMMAND_PREFIX",
    "ExitMarker",
    "after_exit",
    "ended_on_its_own",
    "interrupted_restart",
    "note_decision",
    "read_exit_marker",
    "record_vmm_exit",
]

#: The init's first console line of every boot: markers before it are of an earlier boot.
BOOT_MARKER: Final = "vmfleet init on kernel"
#: The ids of the supervisor's restarts: ``restart-<instance>-<attempt>``.
RESTART_COMMAND_PREFIX: Final = "restart-"
#: hypeman reads the marker in the last 8 KiB of the app log.
_TAIL_BYTES: Final = 8192
_EXIT_LINE: Final = re.compile(r'HYPEMAN-EXIT code=(-?[0-9]+) message="((?:[^"\\]|\\.)*)"')


class ExitMarker(msgspec.Struct, frozen=True):
    code: int
    message: str


def read_exit_marker(app_log: Path) -> ExitMarker | None:
    """The last exit marker of the current boot in the app log's tail, if any."""
    try:
        with open(app_log, "rb") as log:
            log.seek(0, 2)
            size = log.tell()
            log.seek(max(0, size - _TAIL_BYTES))
            tail = log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    # A boot line in the tail: only what follows it is this boot's. None in the tail: the
    # tail is all this boot's (an earlier boot's marker precedes the later boot line).
    this_boot = tail.rpartition(BOOT_MARKER)[2]
    matches = _EXIT_LINE.findall(this_boot)
    if not matches:
        return None
    code, message = matches[-1]
    return ExitMarker(int(code), re.sub(r"\\(.)", r"\1", message))


def record_vmm_exit(ctx: OpContext, inst: LocalInstance, status: int | None) -> ExitMarker | None:
    """The instance's VMM is gone (reaped) without an operation asking for it: Stopped,
    cleanly with the app's exit code when the init left its marker, else as a crash; and
    the restart policy's decision, in the same write."""
    now = utc_now()
    marker = read_exit_marker(inst.guest.app_log)
    restart = after_exit(inst.record, None if marker is None else marker.code, now)
    inst.process = None
    inst.guest.write_pid(None)
    if marker is None:
        ctx.set_state(
            inst,
            InstanceState.STOPPED,
            cause=Event.VMM_EXITED,
            error=f"VMM exited on its own (exit status {status}); see the vmm and app logs",
            stopped_at=now,
            restart=restart,
        )
    else:
        ctx.set_state(
            inst,
            InstanceState.STOPPED,
            cause=Event.APP_EXITED,
            stopped_at=now,
            exit_code=marker.code,
            exit_message=marker.message,
            restart=restart,
        )
    note_decision(ctx, inst, restart)
    return marker


def note_decision(ctx: OpContext, inst: LocalInstance, restart: RestartState) -> None:
    if restart.next_attempt_at is not None:
        ctx.oplog(
            inst,
            "restart scheduled",
            at=restart.next_attempt_at.isoformat(),
            attempt=restart.attempts + 1,
        )
    elif restart.blocked_reason == "max_attempts_exceeded":
        ctx.oplog(inst, "restarts blocked: max_attempts exceeded", level="WARN")


def after_exit(record: InstanceRecord, exit_code: int | None, now: datetime) -> RestartState:
    """What the restart policy makes of the program's end (``exit_code`` None: unknown,
    e.g. a VMM that died without a marker, or a restart that failed to boot)."""
    policy, status = record.restart_policy, record.restart
    if policy is None or status.blocked_reason is not None:
        return msgspec.structs.replace(status, next_attempt_at=None)
    attempts = status.attempts
    if _stable(record, policy.stable_after_s, now):
        attempts = 0  # it ran long enough: a new failure window
    if policy.policy == "on_failure" and exit_code == 0:
        return msgspec.structs.replace(status, attempts=attempts, next_attempt_at=None)
    if policy.max_attempts and attempts >= policy.max_attempts:
        return msgspec.structs.replace(
            status,
            attempts=attempts,
            blocked_reason="max_attempts_exceeded",
            next_attempt_at=None,
        )
    return msgspec.structs.replace(
        status, attempts=attempts, next_attempt_at=now + timedelta(seconds=policy.backoff_s)
    )


def ended_on_its_own(record: InstanceRecord) -> bool:
    """Whether a Stopped instance's program ended by itself (an exit code, or a VMM that
    died: a ``state_error``), rather than by its user's stop."""
    return record.exit_code is not None or record.state_error is not None


def interrupted_restart(
    record: InstanceRecord, interrupted_command: str | None, now: datetime
) -> RestartState | None:
    """The restart a worker died in the middle of, to be taken again: the record says a
    restart's boot had begun (Created or Initializing, the attempt counted and no longer
    scheduled), the interrupted-command mark names a restart, and no VMM survived it. The
    decision stands, so the same attempt is scheduled again, due now; its command id is
    the interrupted one, so the engine runs it once. None: nothing to take again."""
    status = record.restart
    underway = (
        interrupted_command is not None
        and interrupted_command.startswith(RESTART_COMMAND_PREFIX)
        and record.state in (InstanceState.CREATED, InstanceState.INITIALIZING)
        and record.restart_policy is not None
        and status.blocked_reason is None
        and status.next_attempt_at is None
        and status.attempts >= 1
    )
    if not underway:
        return None
    return msgspec.structs.replace(status, attempts=status.attempts - 1, next_attempt_at=now)


def _stable(record: InstanceRecord, stable_after_s: float, now: datetime) -> bool:
    """Whether the instance was up (Running, or Unknown: an adopted VMM whose state could
    not be read) for ``stable_after`` before it ended."""
    return (
        record.state in (InstanceState.RUNNING, InstanceState.UNKNOWN)
        and record.started_at is not None
        and (now - record.started_at).total_seconds() >= stable_after_s
    )
