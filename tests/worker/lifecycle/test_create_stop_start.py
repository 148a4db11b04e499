"""An OCI image becomes a running VM; stop gives the app SIGTERM; start keeps its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.api import InstanceState
from schemas.errors import BadRequest, InvalidState, NotFound
from schemas.messages import Start, Stop
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry
from tests.worker.conftest import create_command, now, wait_for_log
from worker.engine import HostEngine

pytestmark = [pytest.mark.anyio, pytest.mark.vm]

APP = (
    'trap "echo got SIGTERM; exit 0" TERM; '
    'echo "greeting=$GREETING image=$IMAGE_ONLY cwd=$(pwd)"; '
    '[ -f /root/marker ] && echo "marker: $(cat /root/marker)"; '
    "echo survived > /root/marker; "
    "while true; do sleep 1; done"
)


async def test_boot_env_stop_start(
    engine: HostEngine, registry: LocalRegistry, tmp_path: Path
) -> None:
    image = push_image(
        build_busybox_image(
            tmp_path / "oci",
            tag="app",
            workdir="/app",
            env=("PATH=/bin", "GREETING=from-image", "IMAGE_ONLY=kept"),
        ),
        registry.address,
        "app:latest",
    )
    cmd = create_command(image, cmd=["/bin/sh", "-c", APP], env={"GREETING": "hello"})
    record = await engine.execute(cmd)
    assert record is not None and record.state is InstanceState.RUNNING
    assert record.started_at is not None
    guest = engine.instance(cmd.instance_id).guest

    # The instance env wins over the image env; the image's working dir is the app's.
    log = await wait_for_log(guest.app_log, "greeting=hello image=kept cwd=/app")
    assert "marker: survived" not in log

    stopped = await engine.execute(Stop(id="stop-1", instance_id=cmd.instance_id, issued_at=now()))
    assert stopped is not None and stopped.state is InstanceState.STOPPED
    assert "got SIGTERM" in guest.app_log.read_text()
    assert engine.instance(cmd.instance_id).process is None

    with pytest.raises(InvalidState, match="cannot stop from state Stopped, must be Running"):
        await engine.execute(Stop(id="stop-2", instance_id=cmd.instance_id, issued_at=now()))

    started = await engine.execute(
        Start(id="start-1", instance_id=cmd.instance_id, issued_at=now())
    )
    assert started is not None and started.state is InstanceState.RUNNING
    log = await wait_for_log(guest.app_log, "marker: survived")
    # The console log is appended to across boots, never truncated.
    assert log.count("greeting=hello") == 2


async def test_unknown_image_leaves_nothing(engine: HostEngine, registry: LocalRegistry) -> None:
    cmd = create_command(f"{registry.address}/no-such-image:latest", cmd=["true"])
    with pytest.raises(NotFound):
        await engine.execute(cmd)
    assert not engine.ctx.storage.guest(cmd.instance_id).root.exists()
    assert list(engine.records()) == []


@pytest.mark.parametrize("path", ["/", "/etc", "/proc/x", "relative", "/usr/local/data"])
async def test_forbidden_mount_paths_are_refused(
    engine: HostEngine, busybox_image: str, path: str
) -> None:
    volume = await engine.ctx.volumes.create("vol1", "data", 1)
    from schemas.messages import MountSpec

    cmd = create_command(busybox_image, volumes=[MountSpec(volume_id=volume.id, mount_path=path)])
    with pytest.raises(BadRequest, match="mount path"):
        await engine.execute(cmd)
    assert not engine.ctx.storage.guest(cmd.instance_id).root.exists()
    assert engine.ctx.volumes.require("vol1").attachments == []
