"""Hot-attach a volume to a running VM, read its file in the guest, detach it again."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

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
