"""Wake on connection: the worker holds the mapped ports of instances its auto-standby
policy put to sleep, and restores an instance when a client connects to one.

Which instances: a record in Standby with cause ``idle`` (worker.autostandby's standby),
or any Standby of an instance whose auto_standby policy is enabled (:func:`asleep_by_policy`).
Its TCP port mappings are bound by the worker the moment the record says so (inside the
transition callback, so no connection finds the port closed) and again right after a
worker start's recovery, before commands are taken. A Standby for another cause, a
delete, or the end of a wake releases them.

How a wake goes (:class:`worker.wake.sleeper.Sleeper` has the queue and fault rules):

- user mode: the restored QEMU's forwards for the held ports point at internal loopback
  ports (:meth:`WakeManager.launch_spec`), so the worker keeps the public ones; held
  connections go through the internal forwards. Once the guest listens, the worker closes
  its listeners and adds the public forward to the running QEMU with HMP ``hostfwd_add``
  (QEMU 7.2 has it; well under a millisecond, the only moment a connection may be
  refused). Later traffic goes through QEMU alone.
- bridge mode: at sleep the instance's DNAT rules go, the worker binds the mapped ports on
  every address, and connections to the guest's own address are redirected to a port of
  the worker's (worker.wake.catch); the restore's plug puts the DNAT rules back in place of
  the redirects, so new connections take the kernel path from then on, and the held ones
  are relayed to the guest's address.

The wake is a ``Restore`` command with cause ``connection`` executed by the engine, so it
queues behind (and before) API operations on the same instance like any command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
from anyio.abc import ByteStream, TaskGroup, TaskStatus

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import NotFound
from schemas.messages import InstanceRecord, Restore
from worker.drivers.base import PortForward, VmSpec
from worker.drivers.qmp import QmpError
from worker.wake.catch import listen_catch, listen_tcp
from worker.wake.sleeper import (
    Backend,
    GuestNotListening,
    HeldConnection,
    Listener,
    Sleeper,
    WakeSettings,
)
from worker.wake.usernet import UserNet

if TYPE_CHECKING:
    from worker.engine import HostEngine
    from worker.lifecycle.context import LocalInstance

__all__ = ["WakeManager", "attach_wake"]

log = logging.getLogger(__name__)

#: How long a restore waits for a wake's first answer before it resyncs the guest's clock.
SETTLE_TIMEOUT_S = 2.0

#: Observes a finished wake: (cause, seconds).
WokeObserver = Callable[[str, float], None]


class WakeManager:
    def __init__(
        self,
        engine: HostEngine,
        settings: WakeSettings | None = None,
        *,
        on_woke: WokeObserver = lambda cause, seconds: None,
    ) -> None:
        self._engine = engine
        self._settings = settings or WakeSettings()
        self._on_woke = on_woke
        self._sleepers: dict[str, Sleeper] = {}
        self._tg: TaskGroup | None = None
        #: instance id -> when its restore began (an API restore of an instance not held).
        self._restoring: dict[str, float] = {}
        #: instance id -> guest port -> internal loopback port (user mode, during a wake).
        self._internal: dict[str, dict[int, int]] = {}
        #: instance id -> set once a wake's held connections had their first answer.
        self._answered: dict[str, anyio.Event] = {}
        #: instance id -> guest ports the woken guest took a connection on.
        self._listening: dict[str, set[int]] = {}
        self._seq = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the sleepers' tasks until cancelled; then every held port is let go."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            for sleeper in list(self._sleepers.values()):
                sleeper.close()

    # -- which instances sleep --------------------------------------------------------------

    def arm_sleeping(self) -> None:
        """A worker's start: bind the ports of every instance asleep by its policy, and give
        QEMU back the public forwards of any a dead predecessor woke but never handed off."""
        for record in self._engine.records():
            with contextlib.suppress(NotFound):
                inst = self._engine.instance(record.id)
                self.transitioned(inst)
                if self._tg is not None and self._may_lack_forwards(inst):
                    self._tg.start_soon(self._restore_forwards, inst)

    def _may_lack_forwards(self, inst: LocalInstance) -> bool:
        return (
            self._engine.ctx.bridge is None
            and inst.record.state is InstanceState.RUNNING
            and inst.process is not None
            and inst.spec is not None
            and bool(inst.record.port_mappings)
            and inst.record.auto_standby is not None
            and inst.record.auto_standby.enabled
        )

    async def _restore_forwards(self, inst: LocalInstance) -> None:
        """Add each public forward again: QEMU refuses the ones it holds (their port is
        taken, by itself) and takes the ones a wake's hand-off never added."""
        assert inst.spec is not None
        usernet = UserNet(self._engine.ctx.driver.api_socket(inst.spec))
        for nic in inst.spec.nics:
            if nic.mode != "user":
                continue
            for fwd in nic.forwards:
                try:
                    await usernet.add_forwards(nic.id, [fwd])
                except QmpError:
                    continue  # already forwarded: the usual case
                except Exception as exc:
                    log.warning("could not check %s's forwards: %s", inst.id, exc)
                    return
                self._engine.ctx.oplog(
                    inst, f"gave host port {fwd.host_port} back to QEMU after a restart"
                )

    def transitioned(self, inst: LocalInstance) -> None:
        """Follow a record: asleep by its policy -> its ports held; Standby for another
        cause -> let go. Never blocks (binding a socket does not)."""
        record = inst.record
        if record.state is not InstanceState.STANDBY:
            return
        if asleep_by_policy(record):
            self._arm(inst)
        else:
            self.release(inst.id)

    def release(self, instance_id: str) -> None:
        sleeper = self._sleepers.pop(instance_id, None)
        if sleeper is not None:
            sleeper.close()

    def holds(self, instance_id: str) -> bool:
        return instance_id in self._sleepers

    def _arm(self, inst: LocalInstance) -> None:
        if inst.id in self._sleepers or self._tg is None or not inst.record.network_enabled:
            return
        listeners = self._bind(inst) + self._catch(inst)
        if not listeners:
            return
        sleeper = Sleeper(
            inst.id,
            listeners,
            _InstanceBackend(self, inst.id),
            self._settings,
            on_done=self._forget,
        )
        self._sleepers[inst.id] = sleeper
        self._tg.start_soon(self._run_sleeper, sleeper)
        if self._engine.ctx.bridge is not None:
            self._tg.start_soon(self._sleep_rules, inst.id, listeners)
        self._tg.start_soon(_keep_in_page_cache, inst.guest.snapshot / "memory")
        what = [f"port {li.host_port}" for li in listeners if li.catch_ip is None]
        what += [f"address {li.catch_ip}" for li in listeners if li.catch_ip is not None]
        self._engine.ctx.oplog(
            inst, f"asleep: {', '.join(what)}; these wake it on the next connection"
        )

    def _bind(self, inst: LocalInstance) -> list[Listener]:
        address = self._bind_address()
        listeners = []
        for mapping in inst.record.port_mappings:
            if str(mapping.protocol or "tcp") != "tcp":
                continue  # UDP has no connection to hold
            try:
                sock = listen_tcp(address, mapping.host_port)
            except OSError as exc:
                self._engine.ctx.oplog(
                    inst,
                    f"cannot hold port {mapping.host_port} while asleep: a connection to it "
                    "will not wake the instance",
                    level="ERROR",
                    error=exc,
                )
                continue
            listeners.append(Listener(mapping.host_port, mapping.guest_port, sock))
        return listeners

    def _catch(self, inst: LocalInstance) -> list[Listener]:
        """bridge mode: the worker's port that connections to the guest's address are
        redirected to while it sleeps (worker.wake.catch)."""
        if self._engine.ctx.bridge is None or inst.record.ip is None:
            return []
        try:
            sock = listen_catch()
        except OSError as exc:
            self._engine.ctx.oplog(
                inst,
                "cannot catch connections to the guest's address while asleep",
                level="ERROR",
                error=exc,
            )
            return []
        return [Listener(sock.getsockname()[1], 0, sock, catch_ip=inst.record.ip)]

    def _bind_address(self) -> str:
        """user mode: where QEMU would publish the ports; bridge mode: every address (the
        DNAT rules matched any local one)."""
        return (
            "0.0.0.0"
            if self._engine.ctx.bridge is not None
            else self._engine.ctx.network.publish_addr
        )

    async def _run_sleeper(self, sleeper: Sleeper) -> None:
        """A sleeper's failure is its instance's, not the worker's: logged, the ports let go."""
        try:
            await sleeper.run()
        except Exception:
            log.exception("%s: holding its ports failed", sleeper.instance_id)

    async def _sleep_rules(self, instance_id: str, listeners: list[Listener]) -> None:
        """The instance's DNAT rules off while it sleeps, and connections to its guest
        address redirected to the worker's catch port (if it has one)."""
        bridge = self._engine.ctx.bridge
        assert bridge is not None
        catch = next((li for li in listeners if li.catch_ip is not None), None)
        if not self._still_asleep(instance_id):
            return  # a restore began meanwhile: its plug sets the rules
        try:
            if catch is None or catch.catch_ip is None:
                await bridge.nat.remove(instance_id)
            else:
                await bridge.nat.asleep(instance_id, catch.catch_ip, catch.host_port)
        except Exception as exc:
            log.error("%s: could not set the rules of its sleep: %s", instance_id, exc)

    def _still_asleep(self, instance_id: str) -> bool:
        try:
            return self._engine.instance(instance_id).record.state is InstanceState.STANDBY
        except NotFound:
            return False

    def _forget(self, sleeper: Sleeper) -> None:
        if self._sleepers.get(sleeper.instance_id) is sleeper:
            del self._sleepers[sleeper.instance_id]
        self._internal.pop(sleeper.instance_id, None)
        self._listening.pop(sleeper.instance_id, None)

    # -- the restore's hooks (worker.wake.hooks.WakeHooks) ----------------------------------

    def launch_spec(self, instance_id: str, spec: VmSpec, cause: str) -> VmSpec:
        sleeper = self._sleepers.get(instance_id)
        if sleeper is None:
            self._restoring[instance_id] = time.monotonic()
            return spec
        sleeper.restore_started(cause)
        self._answered[instance_id] = anyio.Event()
        if self._engine.ctx.bridge is not None:
            return spec
        held = {listener.host_port for listener in sleeper.listeners}
        internal: dict[int, int] = {}
        nics = []
        for nic in spec.nics:
            forwards = []
            for fwd in nic.forwards:
                if fwd.protocol == "tcp" and fwd.host_port in held:
                    port = internal.setdefault(fwd.guest_port, _free_loopback_port())
                    fwd = PortForward(
                        protocol="tcp",
                        host_addr="127.0.0.1",
                        host_port=port,
                        guest_port=fwd.guest_port,
                    )
                forwards.append(fwd)
            nics.append(msgspec.structs.replace(nic, forwards=tuple(forwards)))
        self._internal[instance_id] = internal
        self._listening.pop(instance_id, None)
        return msgspec.structs.replace(spec, nics=tuple(nics))

    def vm_running(self, instance_id: str) -> None:
        sleeper = self._sleepers.get(instance_id)
        if sleeper is not None:
            sleeper.vm_running()
            return
        started = self._restoring.pop(instance_id, None)
        if started is not None:
            self._on_woke("api", time.monotonic() - started)

    async def settled(self, instance_id: str) -> None:
        answered = self._answered.get(instance_id)
        if answered is not None:
            with anyio.move_on_after(SETTLE_TIMEOUT_S):
                await answered.wait()
        self._answered.pop(instance_id, None)

    def answered(self, instance_id: str) -> None:
        if (event := self._answered.get(instance_id)) is not None:
            event.set()

    def restore_failed(self, instance_id: str, error: str) -> None:
        self._restoring.pop(instance_id, None)
        self.answered(instance_id)
        sleeper = self._sleepers.get(instance_id)
        if sleeper is not None:
            sleeper.restore_failed(error)
            if self._engine.ctx.bridge is not None and self._tg is not None:
                # The restore's plug put the DNAT rules in place of the sleep's: back.
                self._tg.start_soon(self._sleep_rules, instance_id, sleeper.listeners)

    # -- what the sleepers do through the worker ---------------------------------------------

    async def restore(self, instance_id: str) -> None:
        self._seq += 1
        await self._engine.execute(
            Restore(
                id=f"wake-{instance_id}-{self._seq}-{os.getpid()}",
                instance_id=instance_id,
                issued_at=utc_now(),
                cause="connection",
            )
        )

    async def connect(self, instance_id: str, guest_port: int) -> ByteStream:
        inst = self._engine.instance(instance_id)
        if self._engine.ctx.bridge is not None:
            assert inst.record.ip is not None
            return await anyio.connect_tcp(inst.record.ip, guest_port)
        port = self._internal.get(instance_id, {}).get(guest_port)
        if port is None or inst.spec is None:
            raise GuestNotListening(f"no internal forward to guest port {guest_port}")
        listening = self._listening.setdefault(instance_id, set())
        if guest_port in listening:  # it took one already: no need to ask slirp again
            return await anyio.connect_tcp("127.0.0.1", port)
        stream = await UserNet(self._engine.ctx.driver.api_socket(inst.spec)).connect(port)
        listening.add(guest_port)
        return stream

    async def hand_off(self, instance_id: str, listeners: list[Listener]) -> None:
        self._sleepers.pop(instance_id, None)
        inst = self._engine.instance(instance_id)
        bridge = self._engine.ctx.bridge
        if bridge is not None:
            if inst.record.ip is not None:
                await bridge.nat.add(instance_id, inst.record.ip, inst.record.port_mappings)
            return
        if inst.spec is None or inst.process is None:
            return  # gone to sleep or stopped again meanwhile: its next VMM forwards them
        forwards = [
            fwd
            for nic in inst.spec.nics
            for fwd in nic.forwards
            if fwd.protocol == "tcp" and fwd.host_port in {li.host_port for li in listeners}
        ]
        nic_id = next((nic.id for nic in inst.spec.nics if nic.mode == "user"), "net0")
        try:
            await UserNet(self._engine.ctx.driver.api_socket(inst.spec)).add_forwards(
                nic_id, forwards
            )
        except Exception as exc:
            self._engine.ctx.oplog(
                inst, "could not give the mapped ports back to QEMU", level="ERROR", error=exc
            )

    def woke(self, instance_id: str, cause: str, seconds: float, running_s: float) -> None:
        self._on_woke(cause, seconds)
        with contextlib.suppress(NotFound):
            self._engine.ctx.oplog(
                self._engine.instance(instance_id),
                f"woken by {cause} in {seconds * 1000:.0f}ms: the VM ran after "
                f"{running_s * 1000:.0f}ms, the guest took the connection "
                f"{(seconds - running_s) * 1000:.0f}ms later",
            )


class _InstanceBackend(Backend):
    def __init__(self, manager: WakeManager, instance_id: str) -> None:
        self._manager, self._id = manager, instance_id

    async def restore(self) -> None:
        await self._manager.restore(self._id)

    async def connect(self, guest_port: int) -> ByteStream:
        return await self._manager.connect(self._id, guest_port)

    async def hand_off(self, listeners: list[Listener]) -> None:
        await self._manager.hand_off(self._id, listeners)

    def opened(self, conn: HeldConnection) -> None:
        self._report(conn, opened=True)

    def closed(self, conn: HeldConnection) -> None:
        self._report(conn, opened=False)

    def _report(self, conn: HeldConnection, *, opened: bool) -> None:
        registry = getattr(self._manager._engine.ctx, "inbound", None)
        if registry is None:
            return
        report = registry.opened if opened else registry.closed
        # A caught connection as conntrack sees it too (to the guest's port), counted once.
        port = conn.listener.host_port if conn.listener.catch_ip is None else conn.guest_port
        with contextlib.suppress(Exception):
            report(self._id, port, conn.peer[0], conn.peer[1])

    def answered(self) -> None:
        self._manager.answered(self._id)

    def woke(self, cause: str, seconds: float, running_s: float) -> None:
        self._manager.woke(self._id, cause, seconds, running_s)


def asleep_by_policy(record: InstanceRecord) -> bool:
    """A Standby the auto-standby policy stands behind: its own (cause ``idle``), or any
    Standby of an instance whose policy is enabled (a scale-to-zero service put to sleep
    by hand wakes on demand too)."""
    policy = record.auto_standby
    return record.cause == "idle" or (policy is not None and policy.enabled)


def _free_loopback_port() -> int:
    """A loopback port free now, for QEMU to bind a moment later (the kernel hands out
    ephemeral ports in turn, so it is not handed to anyone else in between)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _keep_in_page_cache(memory: Path) -> None:
    """The snapshot's memory is read whole by the restore: ask the kernel to have it in the
    page cache while the instance sleeps, so a wake reads memory, not disk."""

    def advise() -> None:
        with contextlib.suppress(OSError), open(memory, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    await anyio.to_thread.run_sync(advise)


def attach_wake(engine: HostEngine, on_woke: WokeObserver) -> WakeManager:
    """A wake manager that follows the engine's instances and serves its restores' hooks;
    run it (:meth:`WakeManager.run`) before the engine recovers."""
    wake = WakeManager(engine, on_woke=on_woke)
    ctx = engine.ctx
    transitioned, removed = ctx.on_transition, ctx.on_removed

    def on_transition(inst: LocalInstance, previous: InstanceState | None) -> None:
        transitioned(inst, previous)
        wake.transitioned(inst)

    def on_removed(record: InstanceRecord) -> None:
        removed(record)
        wake.release(record.id)

    ctx.on_transition, ctx.on_removed, ctx.wake = on_transition, on_removed, wake
    return wake
