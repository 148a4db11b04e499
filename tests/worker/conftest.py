"""A host engine on a real QEMU, with the real image cache and the test registry."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from schemas.api import Hypervisor
from schemas.clock import utc_now as now
from schemas.messages import Create, Delete
from worker.accel import choose_accel
from worker.drivers.qemu import QemuDriver, qemu_binary
from worker.engine import HostEngine
from worker.guest import DEFAULT_AGENT, ensure_initrd, ensure_kernel
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.storage import Storage
from worker.volumes import VolumeStore

MIB = 1 << 20


@pytest.fixture(scope="session")
def boot_assets(test_assets: Path) -> BootAssets:
    async def prepare() -> BootAssets:
        kernel = await ensure_kernel(test_assets)
        initrd = await ensure_initrd(test_assets, kernel)
        accel = await choose_accel(
            test_assets, qemu=qemu_binary(), kernel=kernel.bzimage, initrd=initrd
        )
        agent = DEFAULT_AGENT if DEFAULT_AGENT.is_file() else None
        return BootAssets(kernel=kernel.bzimage, initrd=initrd, accel=accel, agent=agent)

    return anyio.run(prepare)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Short on purpose: unix socket paths under it must stay within 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="vf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_context(data_dir: Path, boot_assets: BootAssets) -> OpContext:
    return OpContext(
        host_id="test-host",
        storage=Storage(data_dir),
        driver=QemuDriver(),
        images=ImageCache(data_dir / "images"),
        volumes=VolumeStore(data_dir, "test-host"),
        boot=boot_assets,
    )


@pytest.fixture
async def engine(data_dir: Path, boot_assets: BootAssets) -> AsyncIterator[HostEngine]:
    engine = HostEngine(make_context(data_dir, boot_assets))
    try:
        yield engine
    finally:
        await delete_all(engine)


async def delete_all(engine: HostEngine) -> None:
    with anyio.CancelScope(shield=True):
        for record in list(engine.records()):
            await engine.execute(
                Delete(id=f"cleanup-{record.id}", instance_id=record.id, issued_at=now())
            )


_counter = 0


def create_command(
    image: str, *, cmd: list[str] | None = None, name: str = "app", **fields: object
) -> Create:
    global _counter
    _counter += 1
    instance_id = f"i{_counter:03d}{now().strftime('%H%M%S%f')}"[:24]
    values: dict[str, object] = {
        "id": f"cmd-{instance_id}",
        "instance_id": instance_id,
        "issued_at": now(),
        "name": name,
        "image": image,
        "size_bytes": 256 * MIB,
        "overlay_bytes": 256 * MIB,
        "vcpus": 1,
        "hypervisor": Hypervisor.QEMU,
        "cmd": cmd,
    }
    values.update(fields)
    return Create(**values)  # type: ignore[arg-type]


async def wait_for_log(path: Path, text: str, timeout_s: float = 90.0, *, after: int = 0) -> str:
    """Wait until ``text`` appears in a log file (past byte ``after``); return the whole file."""
    with anyio.fail_after(timeout_s):
        while True:
            content = path.read_bytes().decode(errors="replace") if path.exists() else ""
            if text in content.encode()[after:].decode(errors="replace"):
                return content
            await anyio.sleep(0.1)
