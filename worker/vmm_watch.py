"""The VMM watcher: notices a VMM that exits on its own and how the guest's app started.

Every VMM is reaped by its pidfd the moment it exits (:mod:`worker.proc`); this loop turns
such an exit, when no operation caused it, into the instance's new state (Stopped: with
the app's exit code when the guest's init left its exit marker, else as a crash, with
why; :mod:`worker.lifecycle.exits`), and notes in the ops log when the guest's init
reports the app started (or failed to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import anyio

from schemas.api import InstanceState
from worker.guest.control import GuestControlError, guest_request
from worker.lifecycle.context import LocalInstance, OpContext
from worker.lifecycle.exits import record_vmm_exit
from worker.lifecycle.network import unplug
from worker.states import HOLDS_VMM

__all__ = ["watch_vmms"]

#: States from which a VMM's own exit is recorded (an Unknown one may exit too).
_WATCHED = HOLDS_VMM | {InstanceState.UNKNOWN}


async def watch_vmms(
    ctx: OpContext,
    instances: Callable[[], Iterable[LocalInstance]],
    lock: Callable[[str], anyio.Lock],
    interval_s: float = 1.0,
) -> None:
    """Each round, look at every instance no operation holds (``lock``: its lock)."""
    while True:
        await anyio.sleep(interval_s)
        for inst in list(instances()):
            if lock(inst.id).locked():
                continue  # an operation is under way; it owns the VMM for now
            async with lock(inst.id):
                if _died_unwatched(inst):
                    _record_vmm_exit(ctx, inst)
                    await _unplug_quietly(ctx, inst)
                elif inst.state is InstanceState.RUNNING and inst.spec is not None:
                    await _note_app_status(ctx, inst)


def _died_unwatched(inst: LocalInstance) -> bool:
    return inst.process is not None and inst.state in _WATCHED and not inst.process.running()


def _record_vmm_exit(ctx: OpContext, inst: LocalInstance) -> None:
    assert inst.process is not None
    record_vmm_exit(ctx, inst, inst.process.returncode)


async def _unplug_quietly(ctx: OpContext, inst: LocalInstance) -> None:
    try:
        await unplug(ctx, inst)
    except Exception as exc:
        ctx.oplog(inst, "could not release the network", level="WARN", error=exc)


async def _note_app_status(ctx: OpContext, inst: LocalInstance) -> None:
    """Ask the guest's init how the app is doing until it has answered once. Its end needs
    no asking: the init powers the VM off then, and the VMM's exit records it with the exit
    code (asking every second for an instance's whole life costs its guest and this worker
    a request each, for nothing)."""
    if inst.app_status is not None:
        return
    assert inst.spec is not None
    try:
        status = await guest_request(ctx.driver.control_socket(inst.spec), "status", timeout_s=1)
    except GuestControlError:
        return  # still booting, or busy: ask again next round
    if status != inst.app_status and status.split()[0] in ("running", "exited", "failed"):
        inst.app_status = status
        word, _, detail = status.partition(" ")
        message = {"running": "app started", "exited": "app exited", "failed": "app failed"}
        ctx.oplog(
            inst,
            message[word],
            level="ERROR" if word == "failed" else "INFO",
            detail=detail or None,
        )
