"""Running this host's instances' health checks and acting on what they find.

One loop per worker, like :mod:`worker.supervisor`. It wakes :data:`TICK_S` apart, looks
at the records, and starts every check whose interval has passed, all in that one pass: a
plain http or tcp check is a :class:`worker.health_probe.NetProbe` (a non-blocking socket
in the loop's one shared epoll set, at most :data:`MAX_OPEN_PROBES` open at once, the rest
queued);
``exec`` (through the guest agent) and ``https`` checks run as tasks, at most
:data:`MAX_CONCURRENT_CHECKS` at once. A check never takes the instance's lock, so a slow
probe never holds up a command; its result is applied only if the instance is still
Running in the same health window with the same check. Where a probe goes, in either
networking mode, is :func:`worker.health_probe.probe_target`.

Counting (:func:`judge`): ``success_threshold`` successes in a row make the instance
healthy, ``failure_threshold`` failures in a row unhealthy; failures within
``start_period`` of the window's start are noted but never counted; a success clears
``last_error`` (as hypeman does). With restart_policy ``on_failure`` an unhealthy instance
is stopped through the engine by a ``Stop`` marked ``health_check_failed``, whose record
write schedules the restart that :mod:`worker.supervisor` then takes, counted like any
other attempt.

What it costs. Each checked instance has one :class:`_Watch`, kept between checks, that
holds the health as the checks see it. The record (written to disk and published) follows
it only when the status or the last error changes, and otherwise at most every
:data:`STEADY_SAVE_S`: a check every second on a thousand instances must not be a thousand
record writes a second. A success that changes nothing, the common case, only counts in
the watch: no struct, no clock read beyond one float, no log line.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from datetime import UTC, datetime
from typing import Final

import anyio
import msgspec
from anyio.abc import TaskGroup

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import NotFound
from schemas.messages import HealthCheckSpec, HealthState, InstanceRecord, Stop
from worker.engine import HostEngine
from worker.health_probe import (
    MAX_ERROR_CHARS,
    NetProbe,
    ProbeIO,
    ProbeResult,
    http_request,
    ip_literal,
    probe,
    probe_target,
)
from worker.lifecycle.stop import health_restart_due

__all__ = ["MAX_ERROR_CHARS", "ProbeResult", "judge", "probe", "supervise_health"]

log = logging.getLogger(__name__)

TICK_S: Final = 0.25
#: exec and https checks running at once (each is a task).
MAX_CONCURRENT_CHECKS: Final = 32
#: Plain http/tcp probes open at once (each holds a socket); the rest wait their turn.
MAX_OPEN_PROBES: Final = 128
STEADY_SAVE_S: Final = 30.0


class _Watch:
    """One instance's checks within one health window with one check."""

    __slots__ = (
        "busy",
        "check",
        "family",
        "health",
        "instance_id",
        "last_ok",
        "next_due",
        "ok_since_save",
        "record",
        "request",
        "saved",
        "saved_at",
        "seen",
        "target",
        "target_of",
        "window",
    )

    def __init__(self, record: InstanceRecord, check: HealthCheckSpec, now: float) -> None:
        self.instance_id = record.id
        #: The record last seen to match (records are replaced, never changed, so the
        #: same object needs no second look).
        self.record = record
        self.check = check
        self.window = record.health.window_started_at
        #: The health as the checks see it, and the last one written to the record.
        self.health = record.health
        self.saved = record.health
        self.saved_at = now
        #: Successes since ``health`` that changed nothing, and the wall time of the last.
        self.ok_since_save = 0
        self.last_ok = 0.0
        self.next_due = now
        self.busy = False
        #: The tick that last saw the instance checked (a watch not seen is dropped).
        self.seen = 0
        #: The plain probe's address and request, once known (they follow the record).
        self.target: tuple[str, int] | None = None
        self.family: socket.AddressFamily | None = None
        self.request: bytes | None = None
        #: The record ``target`` was worked out from.
        self.target_of: InstanceRecord | None = None

    def matches(self, record: InstanceRecord) -> bool:
        if record is self.record:
            return True
        check = record.health_check
        same = (check is self.check or check == self.check) and (
            record.health.window_started_at == self.window
        )
        if same:
            self.record = record
        return same

    def current(self) -> HealthState:
        """``health`` with the quiet successes counted in."""
        if not self.ok_since_save:
            return self.health
        at = datetime.fromtimestamp(self.last_ok, UTC)
        return msgspec.structs.replace(
            self.health,
            consecutive_successes=self.health.consecutive_successes + self.ok_since_save,
            last_checked_at=at,
            last_success_at=at,
        )

    def quiet_success(self) -> bool:
        """Whether one more success would change nothing but the counters: healthy, and no
        failure or error to clear."""
        health = self.health
        return (
            health.status == "healthy"
            and health.consecutive_failures == 0
            and health.last_error is None
        )


class _Supervisor:
    def __init__(self, engine: HostEngine, tg: TaskGroup, concurrency: int) -> None:
        self.engine = engine
        self.tg = tg
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.watches: dict[str, _Watch] = {}
        self.stopping: set[str] = set()
        self.queued: collections.deque[tuple[_Watch, InstanceRecord]] = collections.deque()
        self.open = 0
        self.io = ProbeIO(asyncio.get_running_loop())
        self.ticks = 0

    def close(self) -> None:
        """The plain probes in flight end with the loop (the tasks end with its group)."""
        self.queued.clear()
        self.io.close()

    # -- scheduling ------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Start every due check; forget the instances no longer checked."""
        self.ticks += 1
        watched = 0
        for record in self.engine.records():
            check = record.health_check
            if check is None or record.state is not InstanceState.RUNNING:
                continue
            watch = self.watches.get(record.id)
            if watch is None or not watch.matches(record):
                # A new window (start, restore) or a new check: counted from scratch.
                watch = self.watches[record.id] = _Watch(record, check, now)
            watch.seen = self.ticks
            watched += 1
            if watch.next_due <= now and not watch.busy:
                watch.busy = True
                # Keep the cadence, unless the loop fell a whole interval behind.
                watch.next_due = max(watch.next_due + check.interval_s, now)
                self._start(watch, record)
        if watched != len(self.watches):
            self._forget_unseen()

    def _forget_unseen(self) -> None:
        for instance_id, watch in list(self.watches.items()):
            if watch.seen != self.ticks:
                # Stopped, deleted or unchecked: the next window starts afresh.
                del self.watches[instance_id]

    def _start(self, watch: _Watch, record: InstanceRecord) -> None:
        check = watch.check
        if check.type == "exec" or check.scheme == "https" or not self._plain_target(watch, record):
            self.tg.start_soon(self._run_task_probe, watch, record)
        elif self.open < MAX_OPEN_PROBES:
            self._open(watch, record)
        else:
            self.queued.append((watch, record))

    def _plain_target(self, watch: _Watch, record: InstanceRecord) -> bool:
        """Whether ``watch`` has an IP address to probe with a plain socket (else the task
        path tries, and reports why it cannot)."""
        if record is watch.target_of:
            return True  # the same record: the same address
        try:
            target = probe_target(
                record,
                watch.check.port,
                bridge=self.engine.ctx.bridge is not None,
                publish_addr=self.engine.ctx.network.publish_addr,
            )
        except OSError:
            return False
        if target != watch.target:
            watch.family = ip_literal(target[0])
            if watch.family is None:
                return False
            watch.target = target
            http = watch.check.type == "http"
            watch.request = http_request(watch.check, *target) if http else None
        watch.target_of = record
        return True

    # -- running ---------------------------------------------------------------------------

    def _open(self, watch: _Watch, record: InstanceRecord) -> None:
        assert watch.target is not None and watch.family is not None
        self.open += 1

        def done(result: ProbeResult) -> None:
            self.open -= 1
            self._finished(watch, record, result)
            while self.queued and self.open < MAX_OPEN_PROBES:
                self._open(*self.queued.popleft())

        check, target, family, request = watch.check, watch.target, watch.family, watch.request
        NetProbe(check, target, family, request, done, self.io).start()

    async def _run_task_probe(self, watch: _Watch, record: InstanceRecord) -> None:
        async with self.limiter:
            result = await probe(self.engine, record, watch.check)
        self._finished(watch, record, result)

    def _finished(self, watch: _Watch, seen: InstanceRecord, result: ProbeResult) -> None:
        watch.busy = False
        try:
            self._apply(watch, result)
        except Exception:
            log.exception("health check of instance %s could not be counted", seen.id)

    # -- counting --------------------------------------------------------------------------

    def _apply(self, watch: _Watch, result: ProbeResult) -> None:
        """Count the result, unless the instance left the window it was probed in."""
        if self.watches.get(watch.instance_id) is not watch:
            return
        try:
            inst = self.engine.instance(watch.instance_id)
        except NotFound:
            return
        record = inst.record
        if record.state is not InstanceState.RUNNING or not watch.matches(record):
            return
        if result.ok and watch.quiet_success():
            watch.ok_since_save += 1
            watch.last_ok = time.time()
            if time.monotonic() - watch.saved_at >= STEADY_SAVE_S:
                self._save(watch, watch.current())
            return
        before = watch.current()
        after = judge(before, watch.check, result, utc_now())
        watch.health, watch.ok_since_save = after, 0
        saved = watch.saved
        if (
            after.status != saved.status
            or after.last_error != saved.last_error
            or time.monotonic() - watch.saved_at >= STEADY_SAVE_S
        ):
            self._save(watch, after)
        if after.status != before.status:
            self.engine.ctx.oplog(
                inst, f"health {before.status} -> {after.status}", error=after.last_error
            )
        if (
            after.status == "unhealthy"
            and watch.instance_id not in self.stopping
            and health_restart_due(inst)
        ):
            self.stopping.add(watch.instance_id)
            self.tg.start_soon(self._restart_unhealthy, inst.record)

    def _save(self, watch: _Watch, health: HealthState) -> None:
        inst = self.engine.instance(watch.instance_id)
        self.engine.ctx.save(inst, health=health)
        watch.health = watch.saved = health
        watch.ok_since_save = 0
        watch.saved_at = time.monotonic()

    async def _restart_unhealthy(self, record: InstanceRecord) -> None:
        """Stop through the engine; the stop's record schedules the start."""
        cmd = Stop(
            id=f"health-{record.id}-{record.restart.attempts + 1}",
            instance_id=record.id,
            issued_at=utc_now(),
            restart_reason="health_check_failed",
        )
        try:
            await self.engine.execute(cmd)
            log.info("instance %s (%s) unhealthy: stopped for a restart", record.id, record.name)
        except NotFound:
            pass
        except Exception as exc:
            log.warning("could not stop unhealthy instance %s: %s", record.id, exc)
        finally:
            self.stopping.discard(record.id)


async def supervise_health(
    engine: HostEngine, *, tick_s: float = TICK_S, concurrency: int = MAX_CONCURRENT_CHECKS
) -> None:
    """Until cancelled: run every due check of this host's Running instances."""
    async with anyio.create_task_group() as tg:
        supervisor = _Supervisor(engine, tg, concurrency)
        try:
            while True:
                try:
                    supervisor.tick(time.monotonic())
                except Exception:
                    # A bug in one pass must not end the checks of every instance for good.
                    log.exception("health checks: a pass failed")
                await anyio.sleep(tick_s)
        finally:
            supervisor.close()


def judge(
    state: HealthState, check: HealthCheckSpec, result: ProbeResult, now: datetime
) -> HealthState:
    """The health after one more check's ``result``."""
    if result.ok:
        successes = state.consecutive_successes + 1
        healthy = successes >= check.success_threshold
        return msgspec.structs.replace(
            state,
            status="healthy" if healthy else state.status,
            consecutive_successes=successes,
            consecutive_failures=0,
            last_checked_at=now,
            last_success_at=now,
            last_error=None,
        )
    error = (result.error or "check failed")[:MAX_ERROR_CHARS]
    noted = msgspec.structs.replace(
        state, consecutive_successes=0, last_checked_at=now, last_failure_at=now, last_error=error
    )
    started = state.window_started_at
    if started is not None and (now - started).total_seconds() < check.start_period_s:
        return noted  # within start_period: noted, never counted
    failures = state.consecutive_failures + 1
    unhealthy = failures >= check.failure_threshold
    return msgspec.structs.replace(
        noted,
        status="unhealthy" if unhealthy else state.status,
        consecutive_failures=failures,
    )
