"""The log shipper follows an instance from the start of its create: a boot's console
lines reach the logs stream while the guest writes them, not once the create ended (which
waits for the guest agent)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from schemas.api import Hypervisor
from schemas.clock import utc_now
from schemas.errors import HypervisorError
from schemas.messages import Create
from tests.worker.bootless import bootless_context
from worker.engine import HostEngine
from worker.images import ImageInfo
from worker.lifecycle.context import LocalInstance

pytestmark = pytest.mark.anyio


def _create(instance_id: str) -> Create:
    return Create(
        id=f"c-{instance_id}",
        instance_id=instance_id,
        issued_at=utc_now(),
        name=instance_id,
        image="busybox:latest",
        size_bytes=256 << 20,
        overlay_bytes=64 << 20,
        vcpus=1,
        hypervisor=Hypervisor.QEMU,
        cmd=["/bin/true"],
    )


async def test_an_instance_being_created_has_its_logs_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = bootless_context(tmp_path)
    engine = HostEngine(ctx)
    pulling = anyio.Event()
    fail_pull = anyio.Event()

    async def slow_pull(inst: LocalInstance) -> ImageInfo:
        pulling.set()
        await fail_pull.wait()
        raise HypervisorError("no image here")

    monkeypatch.setattr(ctx, "pull_image", slow_pull)
    async with anyio.create_task_group() as tg:

        async def create() -> None:
            with pytest.raises(HypervisorError):
                await engine.execute(_create("being-made"))

        tg.start_soon(create)
        await pulling.wait()
        # Mid-create: not in the table yet, but its log directory is followed.
        assert list(engine.records()) == []
        assert engine.log_dirs() == {"being-made": ctx.storage.guest("being-made").logs}
        fail_pull.set()
    # The failed create removed its directory: nothing left to follow.
    assert engine.log_dirs() == {}
