"""What every operation works with: the host's parts (OpContext) and one instance."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import InstanceRecord
from worker.agent.hub import AgentHub
from worker.autostandby.registry import InboundRegistry
from worker.drivers.base import Hypervisor, VmSpec
from worker.host import HostLimits
from worker.images import ImageCache, ImageInfo
from worker.network import BridgeNetwork, NetworkSettings
from worker.proc import VmmProcess
from worker.states import Cause, IllegalTransition, Op, check_edge, check_transition
from worker.storage import GuestDir, Storage
from worker.volumes import VolumeStore
from worker.wake.hooks import WakeHooks

if TYPE_CHECKING:
    from worker.templates.manager import TemplateManager

__all__ = ["BootAssets", "LocalInstance", "OpContext", "Timeouts", "Transitioned", "Walk"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootAssets:
    kernel: Path
    initrd: Path
    accel: str
    #: The guest agent every config disk carries (None: guests without one).
    agent: Path | None = None


@dataclass(frozen=True)
class Timeouts:
    #: How long the app gets between SIGTERM and SIGKILL on stop.
    stop_grace_s: float = 10.0
    #: How long the guest's init may take to answer its control channel after boot.
    guest_ready_s: float = 120.0
    #: Hot-plugged disks appear in the guest after about 2 s under TCG.
    mount_s: float = 60.0


@dataclass
class LocalInstance:
    """An instance as this host holds it: its record (the view), its VMM (the truth)."""

    record: InstanceRecord
    guest: GuestDir
    spec: VmSpec | None = None
    process: VmmProcess | None = None
    #: What the guest's init last said about the app ("running <pid>", "exited <code>").
    app_status: str | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> InstanceState:
        return self.record.state


#: Called after every change of a record: with the previous state when the state changed,
#: with None when only other fields did. It must not block (the daemon queues a publish).
Transitioned = Callable[[LocalInstance, InstanceState | None], None]
#: Told of an edge the state table does not have, before the error is raised (a metric).
Refused = Callable[[InstanceState, InstanceState, Cause], None]


@dataclass
class OpContext:
    host_id: str
    storage: Storage
    driver: Hypervisor
    images: ImageCache
    volumes: VolumeStore
    boot: BootAssets
    timeouts: Timeouts = field(default_factory=Timeouts)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    #: bridge mode's bridge, TAPs, leases and NAT; None in user mode.
    bridge: BridgeNetwork | None = None
    #: None: no limit (tests of one operation); the daemon sets the host's.
    limits: HostLimits | None = None
    on_transition: Transitioned = lambda inst, previous: None
    #: Told how long each image pull took (seconds), for the metrics.
    observe_pull: Callable[[float], None] = lambda seconds: None
    #: Told how long each step of a create took (step, seconds; worker.lifecycle.phases).
    observe_create_phase: Callable[[str, float], None] = lambda phase, seconds: None
    #: Called once an instance's record is gone for good (deleted, or its create undone).
    on_removed: Callable[[InstanceRecord], None] = lambda record: None
    #: The guest agents' hub: readiness waits for the agent (None: tests of one operation).
    agent: AgentHub | None = None
    on_refused_transition: Refused = lambda previous, state, cause: None
    #: Inbound connections the worker itself holds or relays for an instance: the wake
    #: listener reports them, the auto-standby controller counts them.
    inbound: InboundRegistry = field(default_factory=InboundRegistry)
    #: The host's warm templates (worker/templates); None: every create boots cold.
    templates: TemplateManager | None = None
    #: The wake-on-connection component: how a restore starts the VMM while the worker
    #: holds the instance's ports (None: nothing is ever held).
    wake: WakeHooks | None = None

    def walk(self, inst: LocalInstance, op: Op) -> Walk:
        """Begin ``op`` on ``inst``: refused (hypeman's 409) from a state it may not start
        from; else a walk along the op's path in the state table."""
        return Walk(self, inst, op, check_transition(op, inst.state).path)

    def set_state(
        self,
        inst: LocalInstance,
        state: InstanceState,
        *,
        cause: Cause,
        error: str | None = None,
        record_cause: object = None,
        **changes: object,
    ) -> None:
        """Record a transition: the record, its file on disk, then whoever listens.
        ``record_cause``: the record's own ``cause`` field (what asked for a standby or
        restore), which the ``cause`` parameter (the state table's) would shadow.

        An edge the state table does not have for ``cause`` is a bug in the caller: it is
        logged, counted and raised as IllegalTransition, and the record stays as it was.
        """
        previous = inst.record.state
        try:
            check_edge(previous, state, cause)
        except IllegalTransition as exc:
            log.error("%s: %s", inst.id, exc)
            self.on_refused_transition(previous, state, cause)
            raise
        if record_cause is not None:
            changes["cause"] = record_cause
        phases = inst.record.entered(utc_now())
        inst.record = msgspec.structs.replace(
            inst.record, state=state, state_error=error, **phases, **changes
        )
        inst.guest.write(inst.guest.metadata, inst.record)
        self.oplog(inst, f"state {previous.value} -> {state.value}", error=error)
        self.on_transition(inst, previous)

    def save(self, inst: LocalInstance, **changes: object) -> None:
        """Record a change of other fields than the state."""
        assert "state" not in changes, "a change of state goes through set_state"
        inst.record = msgspec.structs.replace(inst.record, **changes)
        inst.guest.write(inst.guest.metadata, inst.record)
        self.on_transition(inst, None)

    async def pull_image(self, inst: LocalInstance) -> ImageInfo:
        """The instance's image: the digest it was created from if this host still has
        it, else pulled (and timed), with progress in the ops log."""
        if inst.record.image_digest:
            cached = self.images.get(inst.record.image_digest)
            if cached is not None:
                return cached
        started = time.monotonic()
        image = await self.images.pull(
            inst.record.image, on_status=lambda status: self.oplog(inst, f"image {status}")
        )
        self.observe_pull(time.monotonic() - started)
        return image

    def oplog(
        self, inst: LocalInstance, message: str, *, level: str = "INFO", **fields: object
    ) -> None:
        """A line in the instance's ops log (hypeman's `hypeman` log source)."""
        extras = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        now = utc_now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{now} {level} {message}" + (f" {extras}" if extras else "")
        try:
            with open(inst.guest.ops_log, "a", encoding="utf-8") as out:
                out.write(line + "\n")
        except FileNotFoundError:
            pass  # the instance's directory is gone (deleted)
        log.log(logging.getLevelName(level), "%s: %s", inst.id, line)


@dataclass
class Walk:
    """One operation's way along its path in the state table (:mod:`worker.states`): each
    :meth:`advance` enters the path's next state; :meth:`fail` leaves the path for one of
    the op's failure states."""

    ctx: OpContext
    inst: LocalInstance
    op: Op
    path: tuple[InstanceState, ...]
    _taken: int = 0

    def advance(self, **changes: Any) -> InstanceState:
        """Enter the next state of the path (``changes``: other fields set with it)."""
        if self._taken >= len(self.path):
            raise IllegalTransition(f"{self.op.value} has no state after {self.path[-1].value}")
        state = self.path[self._taken]
        record_cause = changes.pop("cause", None)  # the record's field, see set_state
        self.ctx.set_state(self.inst, state, cause=self.op, record_cause=record_cause, **changes)
        self._taken += 1
        return state

    @property
    def next_state(self) -> InstanceState | None:
        return self.path[self._taken] if self._taken < len(self.path) else None

    def fail(self, state: InstanceState, *, error: str | None, **changes: object) -> None:
        """Leave the path for ``state`` (one of the op's failure states in the table)."""
        record_cause = changes.pop("cause", None)  # the record's field, see set_state
        self.ctx.set_state(
            self.inst, state, cause=self.op, error=error, record_cause=record_cause, **changes
        )
