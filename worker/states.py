"""The instance state machine: one table, consulted by every operation before it acts.

Each operation lists the states it may start from and the states it passes through; the
last one is where it ends. The messages are hypeman's, so clients that match on them keep
working. Unlike hypeman, attach and detach work: hot on a running VM, and recorded for
the next boot on a stopped one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from schemas.api import InstanceState
from schemas.errors import InvalidState

__all__ = ["TRANSITIONS", "Op", "Transition", "check_transition"]

S = InstanceState


class Op(enum.StrEnum):
    CREATE = "create"
    START = "start"
    STOP = "stop"
    STANDBY = "standby"
    RESTORE = "restore"
    DELETE = "delete"
    ATTACH_VOLUME = "attachvolume"
    DETACH_VOLUME = "detachvolume"


@dataclass(frozen=True)
class Transition:
    allowed_from: frozenset[InstanceState]
    #: States the instance passes through, in order; the last is the result.
    path: tuple[InstanceState, ...]
    #: hypeman's message when the current state is not allowed ({state} is filled in).
    refusal: str

    @property
    def result(self) -> InstanceState | None:
        return self.path[-1] if self.path else None


_ANY = frozenset(InstanceState)

TRANSITIONS: dict[Op, Transition] = {
    Op.CREATE: Transition(frozenset(), (S.CREATED, S.RUNNING), ""),
    Op.START: Transition(
        frozenset({S.STOPPED}),
        (S.CREATED, S.RUNNING),
        "invalid state transition: cannot start from state {state}, must be Stopped",
    ),
    Op.STOP: Transition(
        frozenset({S.RUNNING}),
        (S.SHUTDOWN, S.STOPPED),
        "invalid state transition: cannot stop from state {state}, must be Running",
    ),
    Op.STANDBY: Transition(
        frozenset({S.RUNNING}),
        (S.PAUSED, S.STANDBY),
        "invalid state transition: cannot standby from state {state}",
    ),
    Op.RESTORE: Transition(
        frozenset({S.STANDBY}),
        (S.PAUSED, S.RUNNING),
        "invalid state transition: cannot restore from state {state}",
    ),
    Op.DELETE: Transition(_ANY, (), ""),
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
}


def check_transition(op: Op, state: InstanceState) -> Transition:
    """Return the op's transition, or raise InvalidState with hypeman's message."""
    transition = TRANSITIONS[op]
    if op is not Op.CREATE and state not in transition.allowed_from:
        raise InvalidState(transition.refusal.format(state=state.value))
    return transition
