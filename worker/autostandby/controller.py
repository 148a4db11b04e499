"""The auto-standby controller: once a tick it counts each policy instance's inbound
connections, keeps its idle clock in the record, and sends a standby with cause ``idle``
when the clock has run for the policy's ``idle_timeout``.

The standby is an ordinary :class:`~schemas.messages.Standby` command run by the engine,
under the instance's lock like a user's command, so it cannot interleave with a restore,
a stop or a volume change. Once it holds the lock, the standby asks
:func:`~worker.autostandby.policy.idle_standby_refusal` again: a connection or a hold that
came while it waited wins, and nothing happens. A standby that fails is tried again
only after a pause, so a hypervisor that cannot snapshot is not asked every second.

Writes to the record happen only when something changes (idle -> active, active -> idle,
a hold), not every tick. A worker that restarts reads the clock back from the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from schemas.api import InstanceState
from schemas.autostandby import TRACKING_BRIDGE, TRACKING_USER, AutoStandbyStatus
from schemas.clock import utc_now
from schemas.errors import Conflict, NotFound
from schemas.messages import InstanceRecord, Standby
from worker.autostandby.observe import (
    ObserverError,
    bridge_connections,
    own_endpoints,
    own_inodes,
    read_conntrack,
    read_tcp_sockets,
    user_connections,
)
from worker.autostandby.policy import (
    Observation,
    idle_start,
    ineligibility,
    next_standby_at,
    policy_enabled,
    status_of,
)
from worker.autostandby.registry import Connection, InboundRegistry
from worker.engine import HostEngine

__all__ = ["AutoStandbyController", "InstanceInStandby"]

log = logging.getLogger(__name__)

TICK_S: Final = 1.0
#: How long after a failed idle standby the controller tries again.
RETRY_AFTER_S: Final = 60.0


class InstanceInStandby(Conflict):
    code = "instance_in_standby"


class AutoStandbyController:
    def __init__(
        self,
        engine: HostEngine,
        inbound: InboundRegistry,
        *,
        bridge: bool,
        interval_s: float = TICK_S,
        proc: Path = Path("/proc"),
    ) -> None:
        self._engine = engine
        self._inbound = inbound
        self._bridge = bridge
        self._interval_s = interval_s
        self._proc = proc
        self._mode = TRACKING_BRIDGE if bridge else TRACKING_USER
        self._seen: dict[str, Observation] = {}
        #: Instances whose idle standby is sent and not finished.
        self._queued: set[str] = set()
        self._retry_after: dict[str, datetime] = {}
        self._tg: TaskGroup | None = None

    # -- the loop ------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; the idle standbys run in tasks this owns."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                while True:
                    await anyio.sleep(self._interval_s)
                    try:
                        await self.tick()
                    except Exception:
                        # A bug here must not take the worker down with it; the next
                        # tick starts afresh from the records.
                        log.exception("auto-standby tick failed")
            finally:
                self._tg = None

    async def tick(self, now: datetime | None = None) -> None:
        """Observe, update every policy instance's clock, send the standbys that are due."""
        records = [r for r in self._engine.records() if r.auto_standby is not None]
        watched = [r for r in records if policy_enabled(r) and ineligibility(r) is None]
        observed, error = await self._observe(watched)
        now = now or utc_now()
        for seen in records:
            with contextlib.suppress(NotFound):  # deleted while the tables were read
                # The record as it is now: a command may have changed it meanwhile.
                record = self._engine.get(seen.id)
                self._follow(record, observed.get(record.id, set()), error, now)
        for gone in set(self._seen) - {r.id for r in records}:
            del self._seen[gone]
            self._retry_after.pop(gone, None)

    async def _observe(
        self, records: list[InstanceRecord]
    ) -> tuple[dict[str, set[Connection]], str | None]:
        if not records:
            return {}, None
        try:
            inodes = own_inodes(self._proc)
            ports = (
                set() if self._bridge else {m.host_port for r in records for m in r.port_mappings}
            )
            sockets = read_tcp_sockets(
                self._proc, keep=lambda port, inode: port in ports or inode in inodes
            )
            own = own_endpoints(sockets, inodes=inodes)
            if self._bridge:
                flows = await read_conntrack()
                return {r.id: bridge_connections(r, flows, own) for r in records}, None
            return {r.id: user_connections(r, sockets, own) for r in records}, None
        except ObserverError as exc:
            log.warning("auto-standby cannot count connections: %s", exc)
            return {}, str(exc)

    def _follow(
        self, record: InstanceRecord, seen: set[Connection], error: str | None, now: datetime
    ) -> None:
        held = self._inbound.connections(record.id)
        count = len(seen | held)
        previous = self._seen.get(record.id, Observation())
        last = now if count else previous.last_activity_at
        self._seen[record.id] = Observation(
            connections=count,
            observer_error=error,
            standby_requested=record.id in self._queued,
            tracking_mode=self._mode,
            last_activity_at=last,
        )
        if not policy_enabled(record) or ineligibility(record) is not None or error:
            return
        self._keep_clock(record, count, now)
        if count == 0:
            self._standby_if_due(record.id, now)

    def _keep_clock(self, record: InstanceRecord, count: int, now: datetime) -> None:
        """Stamp the record when the instance turns idle or active (not on every tick)."""
        if count > 0 and record.idle.idle_since is not None:
            self._save_clock(record.id, idle_since=None, last_inbound_activity_at=now)
        elif count == 0 and idle_start(record) is None:
            last = self._seen[record.id].last_activity_at
            self._save_clock(record.id, idle_since=now, last_inbound_activity_at=last)

    def _save_clock(self, instance_id: str, **changes: datetime | None) -> None:
        try:
            inst = self._engine.instance(instance_id)
        except NotFound:
            return
        idle = msgspec.structs.replace(inst.record.idle, **changes)
        self._engine.ctx.save(inst, idle=idle)

    def _standby_if_due(self, instance_id: str, now: datetime) -> None:
        record = self._engine.get(instance_id)
        due = next_standby_at(record)
        if due is None or due > now or instance_id in self._queued or self._tg is None:
            return
        if self._retry_after.get(instance_id, now) > now:
            return
        if self._inbound.in_session(instance_id):
            return  # a user's exec or cp is under way: the standby waits for its end
        self._queued.add(instance_id)
        self._seen[instance_id] = dataclasses.replace(
            self._seen[instance_id], standby_requested=True
        )
        self._tg.start_soon(self._standby, record, now)

    async def _standby(self, record: InstanceRecord, now: datetime) -> None:
        cmd = Standby(
            id=f"autostandby-{record.id}-{int(now.timestamp())}",
            instance_id=record.id,
            issued_at=now,
            cause="idle",
        )
        try:
            await self._engine.execute(cmd)
            log.info("instance %s (%s) is in standby: idle", record.id, record.name)
            self._retry_after.pop(record.id, None)
        except NotFound:
            pass  # deleted meanwhile
        except Conflict as exc:
            log.info("idle standby of %s did not happen: %s", record.id, exc)
        except Exception as exc:
            log.warning("idle standby of %s failed: %s", record.id, exc)
            self._retry_after[record.id] = utc_now() + timedelta(seconds=RETRY_AFTER_S)
        finally:
            self._queued.discard(record.id)

    # -- the host query ------------------------------------------------------------------

    def status(self, instance_id: str, now: datetime | None = None) -> AutoStandbyStatus:
        record = self._engine.get(instance_id)
        return status_of(record, self._observation(record), now or utc_now())

    def hold(self, instance_id: str, now: datetime | None = None) -> AutoStandbyStatus:
        """Postpone the idle standby by one ``idle_timeout`` from now (the newest hold wins)
        and cancel one that is queued; 409 while the instance is in or entering Standby."""
        now = now or utc_now()
        inst = self._engine.instance(instance_id)
        record = inst.record
        if _in_standby(record):
            raise InstanceInStandby(
                f"instance {record.id} is in standby; restore it before holding auto-standby"
            )
        policy = record.auto_standby
        if policy is not None and policy.enabled and ineligibility(record) is None:
            until = now + timedelta(seconds=policy.idle_timeout_s)
            self._engine.ctx.save(inst, idle=msgspec.structs.replace(record.idle, hold_until=until))
            # A queued standby finds the hold once it holds the lock, and stands down.
            self._queued.discard(instance_id)
            self._engine.ctx.oplog(inst, "auto-standby held", until=until.isoformat())
        return self.status(instance_id, now)

    def _observation(self, record: InstanceRecord) -> Observation:
        seen = self._seen.get(record.id)
        if seen is None or ineligibility(record) is not None:
            # Not watched (no policy, or not running): only what the worker itself holds.
            return Observation(
                connections=self._inbound.count(record.id),
                tracking_mode=self._mode,
                last_activity_at=seen.last_activity_at if seen else None,
            )
        return dataclasses.replace(seen, standby_requested=record.id in self._queued)

    def queued(self) -> Iterable[str]:
        return set(self._queued)


def _in_standby(record: InstanceRecord) -> bool:
    """Standby, or a standby under way (Paused before its snapshot exists; a restore's
    Paused still has its snapshot)."""
    if record.state is InstanceState.STANDBY:
        return True
    return record.state is InstanceState.PAUSED and not record.has_snapshot
