"""Deleting this host's instances once their ``expires_at`` has passed.

Who reaps: only the owning worker, the one writer of an instance's record. It looks at
its instances every second (any state: a Standby or Stopped instance expires too) and
deletes an expired one through the engine, under the instance's lock like any command.

Exactly once: a delete removes the instance from the engine's table, so a later look
finds nothing to reap; a user's delete racing it gets the lock first or finds the
instance gone (404). A worker that was down at the deadline (or SIGKILLed in the
middle of the delete) rebuilds its table from disk when it starts again, where the
instance still is until its directory is removed, and reaps it on its first look.
A host that never comes back cannot delete anything: its instances stay, shown
``Unknown``, until it does (docs/api.md, "Tags, expiry and PATCH").
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Final

import anyio
from anyio.abc import TaskGroup

from schemas.clock import utc_now
from schemas.errors import NotFound
from schemas.messages import Delete, InstanceRecord
from worker.engine import HostEngine

__all__ = ["expiry_command_id", "reap_expired"]

log = logging.getLogger(__name__)

#: How often the worker looks for expired instances (hypeman's reaper: every minute).
REAP_INTERVAL_S: Final = 1.0


def expiry_command_id(record: InstanceRecord) -> str:
    """One id per instance and deadline: the ops log and the state event name it."""
    assert record.expires_at is not None
    return f"expire-{record.id}-{int(record.expires_at.timestamp())}"


async def reap_expired(engine: HostEngine, *, interval_s: float = REAP_INTERVAL_S) -> None:
    """Until cancelled: delete every expired instance of this host. A delete that fails
    (a VMM that will not die) is tried again on a later look."""
    reaping: set[str] = set()
    async with anyio.create_task_group() as tg:
        while True:
            _start_reaps(tg, engine, reaping, utc_now())
            await anyio.sleep(interval_s)


def _start_reaps(tg: TaskGroup, engine: HostEngine, reaping: set[str], now: datetime) -> None:
    """One task per expired instance, so that one waiting for its lock (a long start in
    progress) delays no other instance's deletion."""
    for record in list(engine.records()):
        if record.expired(now) and record.id not in reaping:
            reaping.add(record.id)
            tg.start_soon(_reap, engine, record, reaping)


async def _reap(engine: HostEngine, record: InstanceRecord, reaping: set[str]) -> None:
    cmd = Delete(id=expiry_command_id(record), instance_id=record.id, issued_at=utc_now())
    try:
        await engine.execute(cmd)
        log.info(
            "instance %s (%s) expired at %s: deleted", record.id, record.name, record.expires_at
        )
    except NotFound:
        pass  # deleted by a user meanwhile
    except Exception as exc:
        log.warning("could not delete expired instance %s (again shortly): %s", record.id, exc)
    finally:
        reaping.discard(record.id)
