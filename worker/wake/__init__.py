"""Wake on connection: the mapped ports of an instance asleep by its auto-standby policy
are held by the worker, and the first connection restores it (see manager.py)."""

from worker.wake.hooks import WakeHooks
from worker.wake.manager import WakeManager, attach_wake
from worker.wake.sleeper import WakeSettings

__all__ = ["WakeHooks", "WakeManager", "WakeSettings", "attach_wake"]
