"""What a restore asks of the wake component (``OpContext.wake``), kept free of imports of
the lifecycle so that the context can name it."""

from __future__ import annotations

from typing import Protocol

from worker.drivers.base import VmSpec

__all__ = ["WakeHooks"]


class WakeHooks(Protocol):
    def launch_spec(self, instance_id: str, spec: VmSpec, cause: str) -> VmSpec:
        """The device model to start the restoring VMM with: ``spec`` itself, or, while the
        worker holds the instance's mapped ports, one whose forwards do not take them."""
        ...

    def vm_running(self, instance_id: str) -> None:
        """The restored guest runs (before the clock resync and the record's publishing):
        held connections may go to it now."""
        ...

    async def settled(self, instance_id: str) -> None:
        """Return once the connections a wake holds had their first answer from the guest
        (at once if none; bounded): what the guest does next for the restore (its clock)
        would compete with them for its CPU."""
        ...

    def restore_failed(self, instance_id: str, error: str) -> None:
        """The restore failed; the instance is in Standby again."""
        ...
