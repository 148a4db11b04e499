"""Hot-attach a volume to a running VM, read its file in the guest, detach it again."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from schemas.errors import HypervisorError
from schemas.messages import AttachVolume, DetachVolume
from tests.worker.conftest import create_command, now, wait_for_log
from worker.engine import HostEngine

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

READER = (
    "while true; do "
    '  if [ -f /mnt/data/hello.txt ]; then echo "read: $(cat /mnt/data/hello.txt)"; '
    '  else echo "no file"; fi; sleep 0.5; '
    "done"
)


async def test_hot_attach_then_detach(
    engine: HostEngine, busybox_image: str, tmp_path: Path
) -> None:
    volume = await engine.ctx.volumes.create("vol-data", "data", 1)
    src = tmp_path / "hello.txt"
    src.write_text("hello from a volume\n")
    await anyio.run_process(
        [
            "debugfs",
            "-w",
            "-R",
            f"write {src} hello.txt",
            str(engine.ctx.volumes.data_path(volume.id)),
        ]
    )
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", READER])
    await engine.execute(cmd)
    guest = engine.instance(cmd.instance_id).guest
    await wait_for_log(guest.app_log, "no file")

    record = await engine.execute(
        AttachVolume(
            id="att",
            instance_id=cmd.instance_id,
            issued_at=now(),
            volume_id="vol-data",
            mount_path="/mnt/data",
            readonly=False,
        )
    )
    assert record is not None and [v.mount_path for v in record.volumes] == ["/mnt/data"]
    await wait_for_log(guest.app_log, "read: hello from a volume")
    assert [a.instance_id for a in engine.ctx.volumes.require("vol-data").attachments] == [
        cmd.instance_id
    ]

    record = await engine.execute(
        DetachVolume(
            id="det",
            instance_id=cmd.instance_id,
            issued_at=now(),
            volume_id="vol-data",
        )
    )
    assert record is not None and record.volumes == []
    assert engine.ctx.volumes.require("vol-data").attachments == []
    # Unmounted in the guest: the reader finds no file any more.
    await wait_for_log(guest.app_log, "no file", timeout_s=30, after=guest.app_log.stat().st_size)


async def test_a_failed_attach_is_undone_and_attach_detach_repeat_under_the_watcher(
    engine: HostEngine, busybox_image: str
) -> None:
    """A volume the guest cannot mount fails its attach with the guest's reason and leaves
    nothing behind (no disk in the VM, nothing in the records); then attach and detach,
    again and again, while the VMM watcher polls the same control channel, all succeed
    and the guest mounts the volume each time."""
    good = await engine.ctx.volumes.create("vol-good", "good", 1)
    bad = await engine.ctx.volumes.create("vol-bad", "bad", 1)
    with open(engine.ctx.volumes.data_path(bad.id), "r+b") as data:
        data.write(b"\0" * 4 * 1024 * 1024)  # no ext4 superblock any more
    cmd = create_command(busybox_image, cmd=["/bin/sh", "-c", READER])
    await engine.execute(cmd)
    inst = engine.instance(cmd.instance_id)
    await wait_for_log(inst.guest.app_log, "no file")

    def attach(volume_id: str, n: int) -> AttachVolume:
        return AttachVolume(
            id=f"att-{volume_id}-{n}",
            instance_id=cmd.instance_id,
            issued_at=now(),
            volume_id=volume_id,
            mount_path="/mnt/data",
            readonly=False,
        )

    def detach(volume_id: str, n: int) -> DetachVolume:
        return DetachVolume(
            id=f"det-{n}", instance_id=cmd.instance_id, issued_at=now(), volume_id=volume_id
        )

    with pytest.raises(HypervisorError, match="mount"):
        await engine.execute(attach(bad.id, 0))
    assert engine.get(cmd.instance_id).volumes == []
    assert engine.ctx.volumes.require(bad.id).attachments == []
    assert inst.spec is not None and [d for d in inst.spec.disks if d.volume_id] == []

    cycles = 5
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.watch_vmms)
        for n in range(cycles):
            record = await engine.execute(attach(good.id, n))
            assert [v.volume_id for v in record.volumes] == [good.id]
            record = await engine.execute(detach(good.id, n))
            assert record.volumes == []
        tg.cancel_scope.cancel()
    assert engine.ctx.volumes.require(good.id).attachments == []
    log = inst.guest.app_log.read_text()
    assert log.count("mounted serial:") == cycles, log[-3000:]
    assert log.count("unmounted /mnt/data") == cycles, log[-3000:]
