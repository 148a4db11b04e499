"""Requests that cannot work are refused with a typed error and leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import BadRequest, HypervisorError, NotFound, VmfleetError
from schemas.messages import MountSpec
from tests.support.images import build_busybox_image, push_image
from tests.support.processes import live_children
from tests.support.registry import LocalRegistry
from tests.worker.conftest import MIB, create_command
from worker.drivers.qemu import QemuDriver
from worker.engine import HostEngine

pytestmark = pytest.mark.anyio


def assert_nothing_left(engine: HostEngine, instance_id: str) -> None:
    assert not engine.ctx.storage.guest(instance_id).root.exists()
    assert list(engine.records()) == []
    assert not [name for _, name in live_children() if name.startswith("qemu")]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"vcpus": 0}, "invalid_vcpus"),
        ({"vcpus": 17}, "invalid_vcpus"),
        ({"size_bytes": MIB}, "invalid_size"),
        ({"overlay_bytes": MIB}, "invalid_overlay_size"),
    ],
)
async def test_sizes_out_of_range(
    engine: HostEngine, busybox_image: str, fields: dict[str, int], code: str
) -> None:
    cmd = create_command(busybox_image, **fields)
    with pytest.raises(BadRequest) as info:
        await engine.execute(cmd)
    assert info.value.code == code
    assert_nothing_left(engine, cmd.instance_id)


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        (
            [
                MountSpec(volume_id="v", mount_path="/data"),
                MountSpec(volume_id="v", mount_path="/data/"),
            ],
            "duplicate mount path",
        ),
        (
            [MountSpec(volume_id="v", mount_path="/data", overlay=True, overlay_bytes=MIB)],
            "readonly",
        ),
        (
            [MountSpec(volume_id="v", mount_path="/data", readonly=True, overlay=True)],
            "overlay_size",
        ),
    ],
)
async def test_mount_rules(
    engine: HostEngine, busybox_image: str, mounts: list[MountSpec], message: str
) -> None:
    await engine.ctx.volumes.create("v", "data", 1)
    cmd = create_command(busybox_image, volumes=mounts)
    with pytest.raises(BadRequest, match=message):
        await engine.execute(cmd)
    assert_nothing_left(engine, cmd.instance_id)
    assert engine.ctx.volumes.require("v").attachments == []


async def test_missing_volume(engine: HostEngine, busybox_image: str) -> None:
    cmd = create_command(busybox_image, volumes=[MountSpec(volume_id="nope", mount_path="/data")])
    with pytest.raises(NotFound):
        await engine.execute(cmd)
    assert_nothing_left(engine, cmd.instance_id)


async def test_image_without_command(
    engine: HostEngine, registry: LocalRegistry, tmp_path: Path
) -> None:
    image = push_image(
        build_busybox_image(tmp_path / "oci", tag="bare", cmd=()), registry.address, "bare:latest"
    )
    cmd = create_command(image)
    with pytest.raises(BadRequest, match="neither entrypoint nor cmd"):
        await engine.execute(cmd)
    assert_nothing_left(engine, cmd.instance_id)


async def test_qemu_failing_to_start(engine: HostEngine, busybox_image: str) -> None:
    engine.ctx.driver = QemuDriver(binary="/bin/false")
    cmd = create_command(busybox_image, cmd=["sleep", "1"])
    with pytest.raises(HypervisorError, match="did not start") as info:
        await engine.execute(cmd)
    assert isinstance(info.value, VmfleetError)
    assert_nothing_left(engine, cmd.instance_id)


async def test_a_full_host_refuses_and_makes_nothing(
    engine: HostEngine, busybox_image: str
) -> None:
    from worker.host import HostLimits

    engine.ctx.limits = HostLimits(vcpus=4, memory_bytes=128 * MIB)
    cmd = create_command(busybox_image)
    with pytest.raises(VmfleetError) as info:
        await engine.execute(cmd)
    assert (info.value.status, info.value.code) == (503, "host_full")
    assert_nothing_left(engine, cmd.instance_id)
