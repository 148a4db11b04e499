"""The state table: complete, without dead ends, obeyed by the code, agreeing with the gateway."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.openapi import build_spec
from gateway.routes.instances import _WAIT_STATES
from schemas.api import Hypervisor, InstanceState
from schemas.messages import Create
from worker.drivers.qemu import QemuDriver
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, LocalInstance, OpContext
from worker.metrics import WorkerMetrics
from worker.states import (
    EDGES,
    GATEWAY_EVENTS,
    INITIAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Op,
    check_edge,
)
from worker.storage import Storage
from worker.volumes import VolumeStore

S = InstanceState
MIB = 1 << 20


def _worker_edges() -> set[tuple[InstanceState, InstanceState]]:
    """Edges the worker itself takes (not the gateway's derived Unknown)."""
    return {edge for edge, causes in EDGES.items() if causes - GATEWAY_EVENTS}


def test_every_state_is_reachable_from_a_new_instance() -> None:
    edges = _worker_edges()
    seen, todo = {INITIAL}, deque([INITIAL])
    while todo:
        state = todo.popleft()
        for a, b in edges:
            if a is state and b not in seen:
                seen.add(b)
                todo.append(b)
    assert seen == set(InstanceState)


def test_no_state_is_a_dead_end() -> None:
    """Delete leaves any state; beside it, every state has a way on the worker takes."""
    exits = {a for a, _ in _worker_edges()}
    assert exits == set(InstanceState)
    assert TRANSITIONS[Op.DELETE].allowed_from == frozenset(InstanceState)


@pytest.mark.parametrize("op", [op for op in Op if TRANSITIONS[op].path], ids=str)
def test_each_operation_walks_edges_of_the_table(op: Op) -> None:
    transition = TRANSITIONS[op]
    starts = {INITIAL} if op is Op.CREATE else transition.allowed_from
    for start in starts:
        walked = (start, *transition.path)
        for a, b in itertools.pairwise(walked):
            assert op in EDGES[a, b], (op, a, b)
        for a, b in itertools.product(walked[1:-1], transition.on_failure):
            assert op in EDGES[a, b], (op, a, b)


def test_the_paths_hypeman_documents() -> None:
    assert TRANSITIONS[Op.CREATE].path == (S.INITIALIZING, S.RUNNING)
    assert TRANSITIONS[Op.START].path == (S.CREATED, S.INITIALIZING, S.RUNNING)
    assert TRANSITIONS[Op.STOP].path == (S.SHUTDOWN, S.STOPPED)
    assert TRANSITIONS[Op.STANDBY].path == (S.PAUSED, S.STANDBY)
    assert TRANSITIONS[Op.RESTORE].path == (S.PAUSED, S.RUNNING)  # no boot: no Initializing


def test_failure_and_recovery_edges_are_declared() -> None:
    check_edge(S.CREATED, S.STOPPED, Op.START)
    check_edge(S.INITIALIZING, S.STOPPED, Op.START)
    check_edge(S.PAUSED, S.RUNNING, Op.STANDBY)
    check_edge(S.PAUSED, S.STOPPED, Op.STANDBY)
    check_edge(S.PAUSED, S.STANDBY, Op.RESTORE)
    check_edge(S.RUNNING, S.STOPPED, Event.VMM_EXITED)
    check_edge(S.INITIALIZING, S.STOPPED, Event.VMM_EXITED)
    check_edge(S.INITIALIZING, S.RUNNING, Event.ADOPTED)
    check_edge(S.RUNNING, S.STOPPED, Event.RECOVERED)
    check_edge(S.STANDBY, S.UNKNOWN, Event.HEARTBEAT_LOST)
    check_edge(S.UNKNOWN, S.STANDBY, Event.HEARTBEAT_BACK)
    with pytest.raises(IllegalTransition):
        check_edge(S.RUNNING, S.STOPPED, Op.STANDBY)  # a standby that failed began paused


def test_the_table_and_the_gateway_agree() -> None:
    states = {s for edge in EDGES for s in edge}
    assert states == set(InstanceState)
    assert set(_WAIT_STATES) == {s.value for s in InstanceState}
    served = build_spec()["components"]["schemas"]["InstanceState"]["enum"]
    assert served == [s.value for s in InstanceState]
    # A host's lost heartbeat shows any state as Unknown, and its return shows it again.
    for state in InstanceState:
        if state is not S.UNKNOWN:
            assert Event.HEARTBEAT_LOST in EDGES[state, S.UNKNOWN]
            assert Event.HEARTBEAT_BACK in EDGES[S.UNKNOWN, state]


@pytest.fixture
def context(tmp_path: Path) -> Iterator[tuple[OpContext, CollectorRegistry]]:
    registry = CollectorRegistry()
    ctx = OpContext(
        host_id="h",
        storage=Storage(tmp_path),
        driver=QemuDriver(),
        images=ImageCache(tmp_path / "images"),
        volumes=VolumeStore(tmp_path, "h"),
        boot=BootAssets(kernel=tmp_path / "k", initrd=tmp_path / "i", accel="tcg"),
        on_refused_transition=WorkerMetrics(registry).count_refused_transition,
    )
    yield ctx, registry


def _new_instance(ctx: OpContext) -> LocalInstance:
    cmd = Create(
        id="c1",
        instance_id="i1",
        issued_at=datetime.now(UTC),
        name="app",
        image="busybox",
        size_bytes=256 * MIB,
        overlay_bytes=256 * MIB,
        vcpus=1,
    )
    record = cmd.new_record(host="h", hypervisor=Hypervisor.QEMU, created_at=datetime.now(UTC))
    return LocalInstance(record=record, guest=ctx.storage.create_guest("i1"))


def test_a_new_record_is_created(context: tuple[OpContext, CollectorRegistry]) -> None:
    ctx, _ = context
    assert _new_instance(ctx).state is S.CREATED


def test_set_state_refuses_an_edge_not_in_the_table(
    context: tuple[OpContext, CollectorRegistry],
) -> None:
    ctx, registry = context
    inst = _new_instance(ctx)
    ctx.set_state(inst, S.INITIALIZING, cause=Op.CREATE)

    with pytest.raises(IllegalTransition, match="Initializing -> Standby"):
        ctx.set_state(inst, S.STANDBY, cause=Op.CREATE)

    assert inst.state is S.INITIALIZING  # nothing changed, on disk neither
    assert inst.guest.read(inst.guest.metadata, type(inst.record)).state is S.INITIALIZING
    labels = {"previous": "Initializing", "state": "Standby", "cause": "create"}
    assert registry.get_sample_value("vmfleet_worker_refused_transitions_total", labels) == 1


def test_a_walk_follows_the_path_and_stops_at_its_end(
    context: tuple[OpContext, CollectorRegistry],
) -> None:
    ctx, _ = context
    inst = _new_instance(ctx)
    walk = ctx.walk(inst, Op.CREATE)
    assert [walk.advance(), walk.advance()] == [S.INITIALIZING, S.RUNNING]
    with pytest.raises(IllegalTransition):
        walk.advance()
    stop = ctx.walk(inst, Op.STOP)
    assert stop.advance() is S.SHUTDOWN
    assert stop.advance() is S.STOPPED
