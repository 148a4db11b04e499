"""Running this host's instances' health checks and acting on what they find.

One loop per worker, like :mod:`worker.supervisor`: it looks at the records a few times
a second and starts each Running instance's check when its interval has passed, in a
task of its own, at most :data:`MAX_CONCURRENT_CHECKS` at once. A check never takes the
instance's lock, so a slow probe never holds up a command; its result is applied only if
the instance is still Running in the same health window with the same check.

Probes, as hypeman defines them: ``exec`` runs the command through the guest agent (exit
0: healthy); ``http`` GETs the path and wants the exact status; ``tcp`` wants the
connection accepted. A bridge-mode host probes the guest's address; in user mode the
host has no route to the guest, so http/tcp go through the host port mapped to the
checked guest port (the gateway refuses such a check without one).

Counting (:func:`judge`): ``success_threshold`` successes in a row make the instance
healthy, ``failure_threshold`` failures in a row unhealthy; failures within
``start_period`` of the window's start are noted but never counted. With restart_policy
``on_failure`` an unhealthy instance is stopped through the engine by a ``Stop`` marked
``health_check_failed``, whose record write schedules the restart that
:mod:`worker.supervisor` then takes, counted like any other attempt.

The record is written (and so published) when the health status, the failure count or
the error changes, and otherwise at most every :data:`STEADY_SAVE_S` while it stays
healthy: a check every second on a thousand instances must not be a thousand record
writes a second.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import anyio
import msgspec
from anyio.abc import ByteStream, TaskGroup

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import NotFound
from schemas.messages import HealthCheckSpec, HealthState, InstanceRecord, Stop
from worker.agent import Frame
from worker.engine import HostEngine
from worker.lifecycle.stop import health_restart_due

__all__ = ["MAX_ERROR_CHARS", "ProbeResult", "judge", "probe", "supervise_health"]

log = logging.getLogger(__name__)

TICK_S: Final = 0.25
MAX_CONCURRENT_CHECKS: Final = 32
#: hypeman's ``last_error`` is at most 512 characters.
MAX_ERROR_CHARS: Final = 512
STEADY_SAVE_S: Final = 30.0
_MAX_HTTP_HEAD: Final = 8192


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    error: str | None = None


@dataclass
class _Loop:
    engine: HostEngine
    limiter: anyio.CapacityLimiter
    #: Monotonic time of each instance's next check.
    next_due: dict[str, float] = field(default_factory=dict)
    checking: set[str] = field(default_factory=set)
    stopping: set[str] = field(default_factory=set)
    saved_at: dict[str, float] = field(default_factory=dict)


async def supervise_health(
    engine: HostEngine, *, tick_s: float = TICK_S, concurrency: int = MAX_CONCURRENT_CHECKS
) -> None:
    """Until cancelled: run every due check of this host's Running instances."""
    loop = _Loop(engine, anyio.CapacityLimiter(concurrency))
    async with anyio.create_task_group() as tg:
        while True:
            _start_due(tg, loop, time.monotonic())
            await anyio.sleep(tick_s)


def _checked(record: InstanceRecord) -> bool:
    return record.health_check is not None and record.state is InstanceState.RUNNING


def _start_due(tg: TaskGroup, loop: _Loop, now: float) -> None:
    present = set()
    for record in list(loop.engine.records()):
        if not _checked(record):
            continue
        present.add(record.id)
        check = record.health_check
        assert check is not None
        due = loop.next_due.setdefault(record.id, now)
        if due <= now and record.id not in loop.checking:
            loop.checking.add(record.id)
            loop.next_due[record.id] = now + check.interval_s
            tg.start_soon(_check_one, tg, loop, record, check)
    for gone in set(loop.next_due) - present:
        # Stopped, deleted or unchecked: the next window checks at once.
        loop.next_due.pop(gone, None)
        loop.saved_at.pop(gone, None)


async def _check_one(
    tg: TaskGroup, loop: _Loop, record: InstanceRecord, check: HealthCheckSpec
) -> None:
    try:
        async with loop.limiter:
            result = await probe(loop.engine, record, check)
        _apply(tg, loop, record, check, result)
    except Exception:
        log.exception("health check of instance %s failed to run", record.id)
    finally:
        loop.checking.discard(record.id)


def _apply(
    tg: TaskGroup,
    loop: _Loop,
    seen: InstanceRecord,
    check: HealthCheckSpec,
    result: ProbeResult,
) -> None:
    """Count the result, unless the instance left the window it was probed in."""
    try:
        inst = loop.engine.instance(seen.id)
    except NotFound:
        return
    record = inst.record
    same_window = record.health.window_started_at == seen.health.window_started_at
    if record.health_check != check or record.state is not InstanceState.RUNNING or not same_window:
        return
    before = record.health
    after = judge(before, check, result, utc_now())
    if _worth_saving(loop, seen.id, before, after):
        loop.engine.ctx.save(inst, health=after)
        loop.saved_at[seen.id] = time.monotonic()
    if after.status != before.status:
        loop.engine.ctx.oplog(
            inst, f"health {before.status} -> {after.status}", error=after.last_error
        )
    if after.status == "unhealthy" and seen.id not in loop.stopping and health_restart_due(inst):
        loop.stopping.add(seen.id)
        tg.start_soon(_restart_unhealthy, loop, inst.record)


def _worth_saving(loop: _Loop, instance_id: str, before: HealthState, after: HealthState) -> bool:
    steady = (
        before.status == after.status
        and before.consecutive_failures == after.consecutive_failures
        and before.last_error == after.last_error
        and before.last_failure_at == after.last_failure_at
    )
    if not steady:
        return True
    return time.monotonic() - loop.saved_at.get(instance_id, 0.0) >= STEADY_SAVE_S


async def _restart_unhealthy(loop: _Loop, record: InstanceRecord) -> None:
    """Stop through the engine; the stop's record schedules the start."""
    cmd = Stop(
        id=f"health-{record.id}-{record.restart.attempts + 1}",
        instance_id=record.id,
        issued_at=utc_now(),
        restart_reason="health_check_failed",
    )
    try:
        await loop.engine.execute(cmd)
        log.info("instance %s (%s) unhealthy: stopped for a restart", record.id, record.name)
    except NotFound:
        pass
    except Exception as exc:
        log.warning("could not stop unhealthy instance %s: %s", record.id, exc)
    finally:
        loop.stopping.discard(record.id)


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


async def probe(engine: HostEngine, record: InstanceRecord, check: HealthCheckSpec) -> ProbeResult:
    """One check, within its timeout."""
    try:
        with anyio.fail_after(check.timeout_s):
            if check.type == "exec":
                return await _probe_exec(engine, record.id, check)
            host, port = _target(engine, record, check.port)
            if check.type == "tcp":
                stream = await anyio.connect_tcp(host, port)
                await stream.aclose()
                return ProbeResult(True)
            return await _probe_http(host, port, check)
    except TimeoutError:
        return ProbeResult(False, f"timed out after {check.timeout_s:g}s")
    except Exception as exc:
        return ProbeResult(
            False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        )


def _target(engine: HostEngine, record: InstanceRecord, guest_port: int) -> tuple[str, int]:
    """Where the guest's port is reachable from this host."""
    if engine.ctx.bridge is not None:
        if not record.ip:
            raise OSError("the instance has no address")
        return record.ip, guest_port
    for mapping in record.port_mappings:
        if mapping.guest_port == guest_port and mapping.protocol == "tcp":
            address = engine.ctx.network.publish_addr
            return ("127.0.0.1" if address in ("0.0.0.0", "") else address), mapping.host_port
    raise OSError(f"guest port {guest_port} has no host port mapping (user network mode)")


async def _probe_http(host: str, port: int, check: HealthCheckSpec) -> ProbeResult:
    if check.scheme == "https":
        # A health check asks whether the app answers, not who it is: no verification.
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        stream: ByteStream = await anyio.connect_tcp(
            host, port, ssl_context=tls, tls_standard_compatible=False
        )
    else:
        stream = await anyio.connect_tcp(host, port)
    async with stream:
        request = (
            f"GET {check.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: vmfleet-health\r\nConnection: close\r\n\r\n"
        )
        await stream.send(request.encode())
        head = b""
        while b"\r\n" not in head and len(head) < _MAX_HTTP_HEAD:
            try:
                head += await stream.receive()
            except anyio.EndOfStream:
                break
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"not an HTTP answer: {status_line[:100]!r}")
    status = int(parts[1])
    if status != check.expected_status:
        return ProbeResult(
            False, f"GET {check.path}: status {status}, expected {check.expected_status}"
        )
    return ProbeResult(True)


async def _probe_exec(engine: HostEngine, instance_id: str, check: HealthCheckSpec) -> ProbeResult:
    hub = engine.ctx.agent
    if hub is None:
        return ProbeResult(False, "this host has no guest agent")
    request: dict[str, object] = {"command": list(check.command), "tty": False}
    if check.working_dir:
        request["cwd"] = check.working_dir
    output = bytearray()
    async with await hub.open_session(instance_id, "exec") as session:
        await session.send(Frame.json(request))
        await session.send_eof()
        while True:
            try:
                frame = await session.receive()
            except anyio.EndOfStream:
                return ProbeResult(False, "the agent ended the check without an exit code")
            if not frame.text:
                output += frame.data[: MAX_ERROR_CHARS - len(output)]
                continue
            answer = json.loads(frame.data)
            if "exitCode" in answer:
                code = answer["exitCode"]
                if code == 0:
                    return ProbeResult(True)
                text = output.decode("utf-8", errors="replace").strip()
                return ProbeResult(False, f"exit code {code}" + (f": {text}" if text else ""))
            if "error" in answer:
                return ProbeResult(False, str(answer["error"]))
