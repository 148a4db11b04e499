"""A real host engine that never boots: for tests of the supervision loops (health checks,
restarts, recovery) whose VMs are records on disk, as a worker finds them after a restart.

The engine, its storage and its recovery are the real ones; only the boot step is swapped
(:func:`fake_boot`) when a test lets the engine start an instance."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import msgspec
import pytest

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import InstanceRecord
from tests.support.gateway import instance_record
from worker.drivers.qemu import QemuDriver
from worker.engine import HostEngine
from worker.images import ImageCache, ImageInfo
from worker.lifecycle import start
from worker.lifecycle.context import BootAssets, LocalInstance, OpContext, Walk
from worker.storage import Storage
from worker.volumes import VolumeStore

HOST = "test-host"


def bootless_context(data_dir: Path) -> OpContext:
    return OpContext(
        host_id=HOST,
        storage=Storage(data_dir),
        driver=QemuDriver(),
        images=ImageCache(data_dir / "images"),
        volumes=VolumeStore(data_dir, HOST),
        boot=BootAssets(kernel=data_dir / "none", initrd=data_dir / "none", accel="tcg"),
    )


def write_record(ctx: OpContext, instance_id: str, **fields: object) -> InstanceRecord:
    """An instance's directory and record on disk, as a worker left it."""
    record = instance_record(instance_id, f"app-{instance_id[-4:]}", HOST, **fields)
    guest = ctx.storage.create_guest(instance_id)
    guest.write(guest.metadata, record)
    return record


def adopt(engine: HostEngine, record: InstanceRecord) -> LocalInstance:
    """Put a record in the engine's table, as its recovery or a create does."""
    inst = LocalInstance(record=record, guest=engine.ctx.storage.guest(record.id))
    engine._instances[record.id] = inst
    return inst


class BootCounter:
    """Boots that "succeed" at once: Initializing, then Running, counted."""

    def __init__(self) -> None:
        self.boots: list[str] = []

    async def boot_to_running(self, ctx: OpContext, walk: Walk, image: ImageInfo) -> None:
        self.boots.append(walk.inst.id)
        walk.advance(started_at=None)
        walk.advance(started_at=utc_now())


def fake_boot(monkeypatch: pytest.MonkeyPatch, ctx: OpContext) -> BootCounter:
    """Starts on ``ctx`` boot nothing and pull nothing; returns the count of boots."""
    counter = BootCounter()
    monkeypatch.setattr(start, "boot_to_running", counter.boot_to_running)

    async def no_pull(inst: LocalInstance) -> ImageInfo:
        return cast(ImageInfo, None)  # only the (fake) boot would read it

    monkeypatch.setattr(ctx, "pull_image", no_pull)
    return counter


def running(record: InstanceRecord) -> InstanceRecord:
    return msgspec.structs.replace(record, state=InstanceState.RUNNING)
