"""Carrying out the restart policy's decisions on this host's instances.

The decision is taken when a program ends (:mod:`worker.lifecycle.exits`) and written in
the instance's record as ``restart.next_attempt_at``. This loop looks at the records
every second and sends each due restart to the engine as a ``Start`` marked ``restart``,
under the instance's lock like any command; the start takes the schedule only if the
record still holds it, so a restart is done once, however often it is sent. A worker
that restarts mid-backoff reads the schedule back from disk and takes it when due; one
that died in the middle of a restart's boot finds it scheduled again by its recovery
(:func:`worker.lifecycle.exits.interrupted_restart`), under the same command id.

Backoff bounds how often one instance boots, and each restart runs in a task of its own
holding only its instance's lock, so a program that exits at once never holds up the
commands of other instances.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

import anyio
from anyio.abc import TaskGroup

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import NotFound
from schemas.messages import InstanceRecord, Start
from worker.engine import HostEngine
from worker.lifecycle.exits import RESTART_COMMAND_PREFIX

__all__ = ["restart_command_id", "supervise_restarts"]

log = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S: Final = 1.0


def restart_command_id(record: InstanceRecord) -> str:
    """One id per instance and attempt: the ops log and the state events name it."""
    return f"{RESTART_COMMAND_PREFIX}{record.id}-{record.restart.attempts + 1}"


async def supervise_restarts(
    engine: HostEngine, *, interval_s: float = SUPERVISE_INTERVAL_S
) -> None:
    """Until cancelled: take every due restart of this host's instances."""
    restarting: set[str] = set()
    async with anyio.create_task_group() as tg:
        while True:
            _start_due(tg, engine, restarting, utc_now())
            await anyio.sleep(interval_s)


def _due(record: InstanceRecord, now: datetime) -> bool:
    status = record.restart
    return (
        record.state is InstanceState.STOPPED
        and status.blocked_reason is None
        and status.next_attempt_at is not None
        and status.next_attempt_at <= now
    )


def _start_due(tg: TaskGroup, engine: HostEngine, restarting: set[str], now: datetime) -> None:
    for record in list(engine.records()):
        if _due(record, now) and record.id not in restarting:
            restarting.add(record.id)
            tg.start_soon(_restart, engine, record, restarting)


async def _restart(engine: HostEngine, record: InstanceRecord, restarting: set[str]) -> None:
    cmd = Start(
        id=restart_command_id(record), instance_id=record.id, issued_at=utc_now(), restart=True
    )
    try:
        await engine.execute(cmd)
        log.info("instance %s (%s) restarted by its policy", record.id, record.name)
    except NotFound:
        pass  # deleted meanwhile
    except Exception as exc:
        # The start recorded the failure and, if the policy allows, the next attempt.
        log.warning("restart of instance %s failed: %s", record.id, exc)
    finally:
        restarting.discard(record.id)
