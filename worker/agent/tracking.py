"""Keeping the hub in step with the instances: attach when a VM is up, detach otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.agent.hub import AgentHub

if TYPE_CHECKING:
    from worker.drivers.base import Hypervisor
    from worker.lifecycle.context import LocalInstance

__all__ = ["track_instance"]

#: States in which the VM runs the guest (Initializing: its agent has not answered yet).
_LIVE = frozenset({"Initializing", "Running"})


def track_instance(hub: AgentHub, driver: Hypervisor, inst: LocalInstance) -> None:
    """Called after every change of an instance's record (and for each one recovered)."""
    state = inst.record.state.value
    if state in _LIVE and inst.spec is not None and inst.process is not None:
        hub.attach(inst.id, driver.agent_endpoint(inst.spec))
    else:
        hub.detach(inst.id, f"the instance is {state}")
