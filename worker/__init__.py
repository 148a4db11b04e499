"""The host daemon: executes lifecycle commands for the VMs on one host."""

from worker.config import WorkerConfig
from worker.daemon import run_worker

__all__ = ["WorkerConfig", "run_worker"]
