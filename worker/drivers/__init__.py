"""Hypervisor drivers behind one interface (:class:`worker.drivers.base.Hypervisor`)."""

from worker.drivers.base import (
    Capabilities,
    DiskSpec,
    Hypervisor,
    VmSpec,
    VmState,
)

__all__ = ["Capabilities", "DiskSpec", "Hypervisor", "VmSpec", "VmState"]
