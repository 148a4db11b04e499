"""The instance state machine: one table of edges, consulted before every change of state.

Two parts, both here so that a new state or cause is added in one place:

- :data:`TRANSITIONS`: per operation, the states it may start from, the path of states it
  walks when it succeeds, the states a failure may leave it in, and hypeman's refusal
  message (clients match on those) when the current state is not allowed.
- :data:`EDGES`: every ``(from, to)`` pair the product can take, each with the causes that
  take it: an operation (success path or failure) or an event that no command asked for
  (a VMM exiting on its own, a worker restart adopting or missing a VMM, a host's
  heartbeat lost and back as the gateway reports it). It is derived from TRANSITIONS plus
  :data:`_EVENT_EDGES`; :meth:`worker.lifecycle.context.OpContext.set_state` refuses an edge
  or cause that is not in it.

To add a state: add it to ``schemas.api.InstanceState``, give it edges here (an operation's
path, failure states, or an event's edges) and, if a VMM exists in it, put it in
:data:`HOLDS_VMM`; ``tests/worker/test_states.py`` checks that it is reachable and not a
dead end. Unlike hypeman, attach and detach work: hot on a running VM, and recorded for the
next boot on a stopped one.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from schemas.api import InstanceState
from schemas.errors import InvalidState

__all__ = [
    "EDGES",
    "GATEWAY_EVENTS",
    "HOLDS_VMM",
    "INITIAL",
    "TRANSITIONS",
    "Cause",
    "Event",
    "IllegalTransition",
    "Op",
    "Transition",
    "check_edge",
    "check_transition",
]

S = InstanceState


class Op(enum.StrEnum):
    """Operations a command asks for (the command's ``op``)."""

    CREATE = "create"
    START = "start"
    STOP = "stop"
    STANDBY = "standby"
    RESTORE = "restore"
    DELETE = "delete"
    UPDATE = "update"
    ATTACH_VOLUME = "attachvolume"
    DETACH_VOLUME = "detachvolume"
    SNAPSHOT = "createsnapshot"
    RESTORE_SNAPSHOT = "restoresnapshot"
    SET_SNAPSHOT_SCHEDULE = "setsnapshotschedule"


class Event(enum.StrEnum):
    """What changes a state without a command asking for it."""

    #: The VMM exited while no operation held it (guest power-off, crash, OOM kill).
    VMM_EXITED = "vmm-exited"
    #: The app ended and the guest powered off, its init's exit marker in the app log: a
    #: clean Stopped with the app's exit code, not a crash.
    APP_EXITED = "app-exited"
    #: A worker (re)started and found the instance's VMM alive: it takes the VMM's word.
    ADOPTED = "adopted"
    #: A worker (re)started and found no VMM: the disk (a snapshot or not) has the say.
    RECOVERED = "recovered"
    #: The gateway stopped seeing the host's heartbeat: it reports Unknown (no record
    #: changes; the gateway derives it).
    HEARTBEAT_LOST = "heartbeat-lost"
    #: The heartbeat is back: the gateway reports the recorded state again.
    HEARTBEAT_BACK = "heartbeat-back"


Cause = Op | Event


class IllegalTransition(RuntimeError):
    """A programming error: code tried to take an edge the table does not have."""


@dataclass(frozen=True)
class Transition:
    allowed_from: frozenset[InstanceState]
    #: States the instance passes through on success, in order; the last is the result.
    path: tuple[InstanceState, ...]
    #: hypeman's message when the current state is not allowed ({state} is filled in).
    refusal: str
    #: States a failure may leave it in, from wherever on the path it was.
    on_failure: frozenset[InstanceState] = frozenset()

    @property
    def result(self) -> InstanceState | None:
        return self.path[-1] if self.path else None


#: States in which the instance has a VMM: they hold the host's vCPUs and memory.
HOLDS_VMM: frozenset[InstanceState] = frozenset(
    {S.CREATED, S.INITIALIZING, S.RUNNING, S.PAUSED, S.SHUTDOWN}
)

_ANY = frozenset(InstanceState)

TRANSITIONS: dict[Op, Transition] = {
    # The first record of an instance is Created (:data:`INITIAL`); a failed create
    # removes the instance, so it has no failure state.
    Op.CREATE: Transition(frozenset(), (S.INITIALIZING, S.RUNNING), ""),
    Op.START: Transition(
        frozenset({S.STOPPED}),
        (S.CREATED, S.INITIALIZING, S.RUNNING),
        "invalid state transition: cannot start from state {state}, must be Stopped",
        on_failure=frozenset({S.STOPPED}),
    ),
    # Shutdown: the guest is asked to power off, its VMM still exists; Stopped once the
    # VMM is gone. A stop that cannot kill the VMM leaves it in Shutdown (the watcher
    # then records its exit).
    Op.STOP: Transition(
        frozenset({S.RUNNING, S.INITIALIZING}),
        (S.SHUTDOWN, S.STOPPED),
        "invalid state transition: cannot stop from state {state}, must be Running",
    ),
    Op.STANDBY: Transition(
        frozenset({S.RUNNING}),
        (S.PAUSED, S.STANDBY),
        "invalid state transition: cannot standby from state {state}",
        on_failure=frozenset({S.RUNNING, S.STOPPED}),
    ),
    # A restored guest was past its boot when it was saved: no Initializing.
    Op.RESTORE: Transition(
        frozenset({S.STANDBY}),
        (S.PAUSED, S.RUNNING),
        "invalid state transition: cannot restore from state {state}",
        on_failure=frozenset({S.STANDBY}),
    ),
    Op.DELETE: Transition(_ANY, (), ""),
    # PATCH: changes the record (its expiry), never the VM, so no state changes and none
    # is refused (an expired instance is refused by the update itself).
    Op.UPDATE: Transition(_ANY, (), ""),
    Op.ATTACH_VOLUME: Transition(
        frozenset({S.RUNNING, S.STOPPED}),
        (),
        "invalid state transition: cannot attach volume in state {state}, "
        "must be Running or Stopped",
    ),
    Op.DETACH_VOLUME: Transition(
        frozenset({S.RUNNING, S.STOPPED}),
        (),
        "invalid state transition: cannot detach volume in state {state}, "
        "must be Running or Stopped",
    ),
    # A snapshot leaves the instance as it was: a Running one is paused only inside its
    # VMM, for the copy (worker.snapshots.capture).
    Op.SNAPSHOT: Transition(
        frozenset({S.RUNNING, S.STANDBY, S.STOPPED}),
        (),
        "invalid state transition: cannot snapshot from state {state}, "
        "must be Running, Standby or Stopped",
    ),
    # In place: whatever ran is stopped, then the snapshot's memory resumes (kind Standby).
    # A Stopped snapshot's disks are put back by a restore that stays Stopped (no path).
    Op.RESTORE_SNAPSHOT: Transition(
        frozenset({S.RUNNING, S.STANDBY, S.STOPPED}),
        (S.PAUSED, S.RUNNING),
        "invalid state transition: cannot restore a snapshot in state {state}, "
        "must be Running, Standby or Stopped",
        on_failure=frozenset({S.STOPPED}),
    ),
    Op.SET_SNAPSHOT_SCHEDULE: Transition(_ANY, (), ""),
}

#: The state of an instance's first record (before its image is pulled).
INITIAL = S.CREATED

#: States a live VMM may report when a worker adopts it (QEMU's and CH's VM states, or
#: Unknown when it does not answer).
_VMM_REPORTS = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.SHUTDOWN, S.UNKNOWN})


def _pairs(
    sources: Iterable[InstanceState], targets: Iterable[InstanceState]
) -> set[tuple[InstanceState, InstanceState]]:
    return {(a, b) for a, b in itertools.product(sources, targets) if a is not b}


_EVENT_EDGES: dict[Event, set[tuple[InstanceState, InstanceState]]] = {
    # The watcher records it from any state with a VMM (or an unanswering one).
    Event.VMM_EXITED: _pairs(HOLDS_VMM | {S.UNKNOWN}, {S.STOPPED}),
    # Also from Initializing: a job may end before its agent ever answered.
    Event.APP_EXITED: _pairs(HOLDS_VMM | {S.UNKNOWN}, {S.STOPPED}),
    # A record may say anything when its worker died; a live VMM says what it is.
    Event.ADOPTED: _pairs(_ANY, _VMM_REPORTS),
    # No VMM: Standby if a snapshot is on disk, Stopped if not.
    Event.RECOVERED: _pairs(_ANY, {S.STANDBY, S.STOPPED}),
    Event.HEARTBEAT_LOST: _pairs(_ANY, {S.UNKNOWN}),
    Event.HEARTBEAT_BACK: _pairs({S.UNKNOWN}, _ANY),
}

#: Causes only the gateway takes (it derives Unknown; no record is written for them).
GATEWAY_EVENTS = frozenset({Event.HEARTBEAT_LOST, Event.HEARTBEAT_BACK})


def _operation_edges(op: Op, t: Transition) -> set[tuple[InstanceState, InstanceState]]:
    starts = {INITIAL} if op is Op.CREATE else set(t.allowed_from)
    edges: set[tuple[InstanceState, InstanceState]] = set()
    for start in starts:
        walked = (start, *t.path)
        edges |= {(a, b) for a, b in itertools.pairwise(walked) if a is not b}
        # A failure strikes once the walk has begun, before its last step.
        edges |= _pairs(walked[1:-1], t.on_failure)
    return edges


def _build_edges() -> dict[tuple[InstanceState, InstanceState], frozenset[Cause]]:
    causes: dict[tuple[InstanceState, InstanceState], set[Cause]] = {}
    for op, transition in TRANSITIONS.items():
        for edge in _operation_edges(op, transition):
            causes.setdefault(edge, set()).add(op)
    for event, edges in _EVENT_EDGES.items():
        for edge in edges:
            causes.setdefault(edge, set()).add(event)
    return {edge: frozenset(c) for edge, c in causes.items()}


#: (from, to) -> the operations and events that take that edge.
EDGES: dict[tuple[InstanceState, InstanceState], frozenset[Cause]] = _build_edges()


def check_transition(op: Op, state: InstanceState) -> Transition:
    """Return the op's transition, or raise InvalidState with hypeman's message."""
    transition = TRANSITIONS[op]
    if op is not Op.CREATE and state not in transition.allowed_from:
        raise InvalidState(transition.refusal.format(state=state.value))
    return transition


def check_edge(previous: InstanceState, state: InstanceState, cause: Cause) -> None:
    """Raise IllegalTransition unless ``cause`` may take the instance from ``previous``
    to ``state``."""
    if cause not in EDGES.get((previous, state), frozenset()):
        raise IllegalTransition(
            f"no edge {previous.value} -> {state.value} for {cause.value} in the state table"
        )
