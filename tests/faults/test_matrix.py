"""Fault x operation: SIGKILL a worker, the gateway, a nats-server or QEMU while an
operation runs, bring the component back (not QEMU), retry the call with its
``Idempotency-Key``, and check that the fleet converges: records match the host, nothing
is left over, nothing happened twice.

Cells of one fault share an instance, in the order create → standby → restore → attach →
stop, each bringing it to the state it needs when the one before left it elsewhere.
"""

from __future__ import annotations

import random
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.ids import derived_id
from tests.faults.report import FAULTS, OPS, REPORT, SEED, Cell
from tests.faults.stack import Answer, Stack, qemu_pids

pytestmark = pytest.mark.vm

CELLS = [(fault, op) for fault in FAULTS for op in OPS]
#: A restarted component is started again this long after it was killed.
OUTAGE_S = 1.0
#: How long the records must stay unchanged to count as converged.
STABLE_S = 2.0
CONVERGE_S = 150.0
#: What each operation leaves when it completes.
TARGET = {
    "create": "Running",
    "standby": "Standby",
    "restore": "Running",
    "attach": "Running",
    "stop": "Stopped",
}
SETTLED = frozenset({"Running", "Stopped", "Standby"})


@pytest.fixture(scope="module")
def chains() -> dict[str, str]:
    """fault → the instance its cells work on."""
    return {}


@dataclass
class Injection:
    what: str
    at_s: float
    #: False when the operation had already answered (the fault came late).
    during_op: bool


@pytest.mark.parametrize(("fault", "op"), CELLS, ids=[f"{f}-{o}" for f, o in CELLS])
def test_fault_during_operation(stack: Stack, chains: dict[str, str], fault: str, op: str) -> None:
    rng = random.Random(f"{SEED}:{fault}:{op}")
    iid = _prepare(stack, chains, fault, op)
    key = f"{fault}-{op}-{secrets.token_hex(4)}"
    if op == "create":
        iid = derived_id("instance", key)
    assert iid is not None
    method, path, body = _request(stack, op, iid, name=f"{fault}-{op}")
    delay = rng.uniform(0.1, 0.7) * stack.durations[op]
    print(f"seed {SEED}: {fault} x {op}, fault after {delay:.2f}s, key {key}")
    leader = stack.commands_leader() if fault == "nats" else None

    started = time.monotonic()
    call = stack.in_flight(method, path, key=key, json=body)
    time.sleep(delay)
    injection = _inject(stack, fault, iid, call, started, leader)
    restarted = _bring_back(stack, fault, leader)
    first = call.result()
    answered = time.monotonic()
    first_after = answered - started
    final, attempts = (first, 1)
    if first.retryable:
        final, attempts = stack.retry(method, path, key=key, json=body)
        attempts += 1

    _converged(stack)
    instances = [i for i in stack.instances() if i["id"] == iid]
    record = instances[0] if instances else None
    state = record["state"] if record else "gone"
    detail = (
        f"{injection.what} {injection.at_s:.2f} s in"
        + ("" if injection.during_op else " (after the operation had answered)")
        + f"; first answer {first.short()} after {first_after:.0f} s"
        + (f" ({answered - restarted:.1f} s after the restart)" if restarted else "")
        + (f", {attempts} calls in all, last {final.short()}" if attempts > 1 else "")
        + f"; ended {state}"
        + (f" (state_error: {record['state_error']})" if record and record["state_error"] else "")
    )
    cell = REPORT.cells[(fault, op)] = Cell(
        outcome=_outcome(final, attempts, record, op), detail=detail
    )
    print(detail)

    # Nothing happened twice.
    if op == "create":
        named = [i for i in stack.instances() if i["name"] == f"{fault}-{op}"]
        assert len(named) <= 1, f"a retried create made {len(named)} instances"
    if record is not None and op == "attach":
        mounts = [v for v in record.get("volumes") or [] if v["volume_id"] == stack.volume_id]
        assert len(mounts) <= 1, record

    # The outcome is the right one for the fault.
    if fault == "qemu":
        _check_qemu_outcome(op, final, record)
    else:
        assert final.status is not None and final.status < 300, (
            f"the {fault} came back, yet the retried {op} ended {final.short()}: {final.body}"
        )
        assert state == TARGET[op], f"{op} answered {final.short()} but the instance is {state}"
        assert not record or not record["state_error"], record
        if op == "attach":
            assert record and [v["volume_id"] for v in record["volumes"]] == [stack.volume_id]
    if record is not None:
        chains[fault] = iid
    cell.passed = True


def _outcome(final: Answer, attempts: int, record: dict[str, Any] | None, op: str) -> str:
    """The table's words for a cell."""
    ok = final.status is not None and final.status < 300
    state = record["state"] if record else None
    if ok and state == TARGET[op]:
        return "completed" if attempts == 1 else f"completed after retry ({attempts} calls)"
    if record is None:
        ends = "no instance left"
    else:
        ends = f"ends {state}" + (" with a state_error" if record["state_error"] else "")
    if ok:
        return f"answered {final.short()}, then the VM died: {ends}"
    return f"failed cleanly ({final.short()}); {ends}"


def _check_qemu_outcome(op: str, final: Answer, record: dict[str, Any] | None) -> None:
    """QEMU is not brought back: the op either finished before the kill took effect, or
    fails cleanly, and a VM whose QEMU died is recorded Stopped with a state_error (a
    restore that failed leaves the instance in Standby, snapshot kept, to try again)."""
    ok = final.status is not None and final.status < 300
    state = record["state"] if record else "gone"
    if not ok:
        assert final.code is not None and final.body.get("message"), final.body
    if op == "stop":  # the VM is stopped, as asked: a QEMU that died on the way is no error
        assert ok and state == "Stopped" and not record["state_error"], (final.short(), record)  # type: ignore[index]
        return
    if op == "create" and not ok:
        assert record is None, f"a failed create left {record}"
        return
    assert record is not None
    if state == "Stopped" and op != "stop":
        assert record["state_error"], (
            f"Stopped after the QEMU kill, without a state_error: {record}"
        )
    allowed = {
        "create": {"Stopped"},  # booted, then noticed dead
        "standby": {"Standby", "Stopped"},  # snapshot complete before the kill, or failed
        "restore": {"Standby", "Stopped"},  # failed (snapshot kept), or restored then died
        "attach": {"Stopped"},
        "stop": {"Stopped"},
    }[op]
    assert state in allowed, f"{op} with QEMU killed ended {state}: {record}"
    if state == "Standby" and not ok:
        assert record["has_snapshot"] and record["state_error"], record


# -- preparing each cell ---------------------------------------------------------------------


def _prepare(stack: Stack, chains: dict[str, str], fault: str, op: str) -> str | None:
    """Bring this fault's instance to the state ``op`` starts from (create: none at all).
    Every cell starts from a live host: a cell before it may have restarted NATS, and a
    create refused 503 while the host's heartbeat is not seen yet never meets the fault."""
    stack.wait_host_live()
    if op == "create":
        for inst in stack.instances():
            if inst.get("host") == stack.host:
                stack.ok("DELETE", f"/instances/{inst['id']}")
        chains.pop(fault, None)
        return None
    iid = chains.get(fault)
    record = stack.instance(iid) if iid else None
    if record is None:
        iid = stack.ok("POST", "/instances", json=stack.create_body(f"{fault}-{op}-fresh"))["id"]
        stack.wait_guest_up(iid, 0)
        record = stack.instance(iid)
        assert record is not None
    assert iid is not None
    if op == "restore":
        _bring_to(stack, iid, record["state"], "Running")
        stack.ok("POST", f"/instances/{iid}/standby")
    else:
        _bring_to(stack, iid, record["state"], "Running")
    if op in ("attach", "stop"):
        stack.wait_guest_up(iid, 0)  # the guest's init answers the control channel
    if op == "attach":
        volume = stack.ok("GET", f"/volumes/{stack.volume_id}")
        for attachment in volume.get("attachments") or []:
            stack.ok("DELETE", f"/instances/{attachment['instance_id']}/volumes/{stack.volume_id}")
    return iid


def _bring_to(stack: Stack, iid: str, state: str, wanted: str) -> None:
    assert wanted == "Running"
    if state == "Standby":
        stack.ok("POST", f"/instances/{iid}/restore")
    elif state == "Stopped":
        boots = stack.boots_seen(iid)
        stack.ok("POST", f"/instances/{iid}/start")
        stack.wait_guest_up(iid, boots)
    assert (stack.instance(iid) or {}).get("state") == "Running"


def _request(stack: Stack, op: str, iid: str, *, name: str) -> tuple[str, str, object]:
    if op == "create":
        return "POST", "/instances", stack.create_body(name)
    if op == "attach":
        return "POST", f"/instances/{iid}/volumes/{stack.volume_id}", {"mount_path": "/data"}
    return "POST", f"/instances/{iid}/{op}", None


# -- faults ----------------------------------------------------------------------------------


def _inject(
    stack: Stack, fault: str, iid: str, call: Future[Answer], started: float, leader: int | None
) -> Injection:
    during = not call.done()
    if fault == "worker":
        stack.worker.kill()
        what = "SIGKILL worker"
    elif fault == "gateway":
        stack.gateway.kill()
        what = "SIGKILL gateway"
    elif fault == "nats":
        assert leader is not None
        stack.cluster.servers[leader].kill()
        what = f"SIGKILL nats-server n{leader} (commands stream leader)"
    else:
        marker = f"{stack.guest_dir(iid)}/"
        # Create and restore start their QEMU part-way: kill it as soon as there is one.
        while not (pids := qemu_pids(marker)) and not call.done():
            time.sleep(0.01)
        during = not call.done()
        killed = stack.kill_qemu(iid) if pids else []
        what = f"SIGKILL QEMU pid {killed[0]}" if killed else "no QEMU to kill"
    return Injection(what=what, at_s=time.monotonic() - started, during_op=during)


def _bring_back(stack: Stack, fault: str, leader: int | None) -> float | None:
    """Start the killed component again; when it was started (None: QEMU, not restarted)."""
    if fault == "qemu":
        return None
    time.sleep(OUTAGE_S)
    restarted = time.monotonic()
    if fault == "worker":
        stack.restart_worker()
    elif fault == "gateway":
        stack.restart_gateway()
    else:
        assert leader is not None
        stack.restart_nats(leader)
    return restarted


# -- convergence -----------------------------------------------------------------------------


def _converged(stack: Stack) -> None:
    """Within CONVERGE_S: nothing in flight, and the same consistent picture twice,
    STABLE_S apart. Fails with the last inconsistency seen."""
    deadline = time.monotonic() + CONVERGE_S
    previous: object = None
    problem = "never checked"
    while time.monotonic() < deadline:
        try:
            picture = _consistent_picture(stack)
        except AssertionError as exc:
            problem, previous = str(exc), None
        else:
            if picture == previous:
                return
            previous, problem = picture, "records still changing"
        time.sleep(STABLE_S)
    raise AssertionError(f"no convergence within {CONVERGE_S:g}s: {problem}")


def _consistent_picture(stack: Stack) -> object:
    """Check every invariant once; return what must not change between two checks."""
    health = stack.call("GET", "/health")
    assert health.status == 200, f"/health: {health.short()}"
    assert stack.commands_settled(), "commands still queued or unacknowledged"
    records = [r for r in stack.instances() if r.get("host") == stack.host]
    ids = {r["id"] for r in records}
    for r in records:
        state, real = r["state"], stack.reality(r["id"])
        where = f"{r['id']} ({r['name']}) {state}: {real}"
        assert state in SETTLED, f"{where}: not settled"
        assert r["has_snapshot"] == (state == "Standby"), where
        if state == "Running":
            assert len(real.qemu) == 1 and real.pid_file == real.qemu[0], where
            assert "qmp.sock" in real.sockets, where
        else:
            assert not real.qemu, f"{where}: a QEMU runs for it"
            assert not real.sockets, f"{where}: sockets left over"
            assert real.snapshot == (state == "Standby"), where
    accounted = {p for r in records if r["state"] == "Running" for p in stack.reality(r["id"]).qemu}
    orphans = set(stack.worker.qemu_processes()) - accounted
    assert not orphans, f"QEMU processes no record accounts for: {sorted(orphans)}"
    on_disk = {p.name for p in (stack.worker.data_dir / "guests").iterdir() if p.is_dir()}
    assert on_disk == ids, f"guest directories {sorted(on_disk)} but records {sorted(ids)}"
    volume = stack.ok("GET", f"/volumes/{stack.volume_id}")
    attached = sorted(a["instance_id"] for a in volume.get("attachments") or [])
    mounting = sorted(
        r["id"]
        for r in records
        for v in r.get("volumes") or []
        if v["volume_id"] == stack.volume_id
    )
    assert attached == mounting, f"volume attached to {attached}, records mount it in {mounting}"
    return sorted((r["id"], r["state"], r["state_error"]) for r in records)
