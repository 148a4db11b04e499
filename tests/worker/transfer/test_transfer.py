"""worker.transfer against a real NATS server: what a host ends up with on disk.

No VM: bundles are directories of made-up files (random bytes, a sparse file, a nested
one, an empty one) with small parts, so a few hundred KiB make many parts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import nats
import pytest
from nats.js.object_store import ObjectStore

from natsbus import Layout, provision
from schemas.subjects import Subjects
from worker.transfer import (
    BundleNotFound,
    CorruptTransfer,
    HostCache,
    delete_bundle,
    open_store,
    read_manifest,
    upload_bundle,
)
from worker.transfer.names import part_object

pytestmark = pytest.mark.anyio

PART = 64 << 10


class BrokenOff(Exception):
    """Stands for a connection lost or a worker killed in the middle of a transfer."""


@pytest.fixture
async def store(nats_url: str, subject_prefix: str) -> AsyncIterator[ObjectStore]:
    nc = await nats.connect(nats_url)
    try:
        subjects = Subjects(subject_prefix)
        await provision(nc.jetstream(), subjects, Layout())
        yield await open_store(nc.jetstream(), subjects)
    finally:
        await nc.close()


def make_bundle(root: Path, seed: int = 0, size: int = 300_000) -> Path:
    root.mkdir(parents=True)
    (root / "memory").write_bytes(os.urandom(size))
    with (root / "sparse.raw").open("wb") as f:  # mostly holes, a little data
        f.truncate(1 << 20)
        f.seek(PART * 5 + 17)
        f.write(b"data in the middle %d" % seed)
    (root / "disks").mkdir()
    (root / "disks" / "overlay.qcow2").write_bytes(os.urandom(PART + 1))
    (root / "disks" / "overlay.qcow2").chmod(0o600)
    (root / "empty").touch()
    return root


def digests(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mode & 0o777,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Breaker:
    """Progress hook that breaks a transfer off after ``after`` parts, once."""

    after: int
    armed: bool = True

    def __call__(self, done: int) -> None:
        if self.armed and done >= self.after:
            self.armed = False
            raise BrokenOff


async def test_a_bundle_arrives_byte_for_byte_and_holes_are_not_sent(
    store: ObjectStore, tmp_path: Path
) -> None:
    source = make_bundle(tmp_path / "source")
    sent = await upload_bundle(store, "snap-1", source, part_bytes=PART)
    sparse_parts = (1 << 20) // PART
    assert sent.parts_skipped == sparse_parts - 1  # only the part with data is sent
    assert sent.bytes_sent < 300_000 + PART + 1 + 2 * PART

    cache = HostCache(store, tmp_path / "cache", budget_bytes=1 << 30)
    fetched = await cache.fetch("snap-1")
    assert digests(fetched) == digests(source)
    assert fetched.joinpath("sparse.raw").stat().st_blocks * 512 < 1 << 20  # still sparse
    assert not any((tmp_path / "cache" / ".partial").iterdir())

    again = await upload_bundle(store, "snap-1", source, part_bytes=PART)
    assert again.bytes_sent == 0  # a published bundle is not uploaded twice
    await delete_bundle(store, "snap-1")
    assert await read_manifest(store, "snap-1") is None
    with pytest.raises(BundleNotFound):
        await HostCache(store, tmp_path / "other", budget_bytes=1 << 30).fetch("snap-1")


async def test_files_from_elsewhere_travel_under_the_name_given(
    store: ObjectStore, tmp_path: Path
) -> None:
    """A moved instance takes the image disk its memory ran on, from outside its directory."""
    source = make_bundle(tmp_path / "source")
    disk = tmp_path / "images" / "rootfs.ext4"
    disk.parent.mkdir()
    disk.write_bytes(os.urandom(3 * PART + 5))
    await upload_bundle(
        store,
        "move-2",
        source,
        part_bytes=PART,
        exclude=frozenset({"disks"}),
        extra={"image-root.ext4": disk},
    )
    fetched = await HostCache(store, tmp_path / "cache", budget_bytes=1 << 30).fetch("move-2")
    expected = {k: v for k, v in digests(source).items() if not k.startswith("disks/")}
    expected["image-root.ext4"] = (hashlib.sha256(disk.read_bytes()).hexdigest(), 0o644)
    assert digests(fetched) == expected


async def test_a_fetch_broken_halfway_resumes_and_nothing_half_made_is_in_place(
    store: ObjectStore, tmp_path: Path
) -> None:
    source = make_bundle(tmp_path / "source")
    await upload_bundle(store, "snap-2", source, part_bytes=PART)
    cache = HostCache(store, tmp_path / "cache", budget_bytes=1 << 30, parallel=1)
    cache.on_part = Breaker(after=3)
    with pytest.raises(BrokenOff):
        await cache.fetch("snap-2")
    assert not cache.has("snap-2")
    assert (tmp_path / "cache" / ".partial" / "snap-2").is_dir()

    fetched = await cache.fetch("snap-2")
    assert cache.last_stats is not None and cache.last_stats.parts_kept >= 3
    assert digests(fetched) == digests(source)


async def test_a_partial_that_went_bad_is_fetched_again_not_used(
    store: ObjectStore, tmp_path: Path
) -> None:
    source = make_bundle(tmp_path / "source")
    await upload_bundle(store, "snap-3", source, part_bytes=PART)
    cache = HostCache(store, tmp_path / "cache", budget_bytes=1 << 30, parallel=1)
    cache.on_part = Breaker(after=4)
    with pytest.raises(BrokenOff):
        await cache.fetch("snap-3")
    memory = tmp_path / "cache" / ".partial" / "snap-3" / "memory"
    with memory.open("r+b") as f:  # a torn write where a complete part was
        f.write(b"\xff" * 100)
    fetched = await cache.fetch("snap-3")
    assert digests(fetched) == digests(source)


async def test_an_upload_broken_halfway_is_not_fetchable_then_resumes(
    store: ObjectStore, tmp_path: Path
) -> None:
    source = make_bundle(tmp_path / "source")
    with pytest.raises(BrokenOff):
        await upload_bundle(
            store, "move-1", source, part_bytes=PART, parallel=1, on_part=Breaker(2)
        )
    cache = HostCache(store, tmp_path / "cache", budget_bytes=1 << 30)
    with pytest.raises(BundleNotFound):
        await cache.fetch("move-1")
    resumed = await upload_bundle(store, "move-1", source, part_bytes=PART)
    assert resumed.parts_skipped >= 2 + (1 << 20) // PART - 1
    assert digests(await cache.fetch("move-1")) == digests(source)


async def test_a_corrupted_part_is_detected_and_nothing_is_kept(
    store: ObjectStore, tmp_path: Path
) -> None:
    source = make_bundle(tmp_path / "source")
    sent = await upload_bundle(store, "snap-4", source, part_bytes=PART)
    memory_index = [f.path for f in sent.manifest.files].index("memory")
    name = part_object("snap-4", memory_index, 2)
    await store.put(name, os.urandom(PART))  # same length, other bytes
    cache = HostCache(store, tmp_path / "cache", budget_bytes=1 << 30)
    with pytest.raises(CorruptTransfer, match="memory part 2"):
        await cache.fetch("snap-4")
    assert not cache.has("snap-4")
    assert not (tmp_path / "cache" / ".partial" / "snap-4").exists()


async def test_concurrent_fetches_of_one_bundle_fetch_it_once(
    store: ObjectStore, tmp_path: Path
) -> None:
    source = make_bundle(tmp_path / "source")
    await upload_bundle(store, "snap-5", source, part_bytes=PART)
    cache = HostCache(store, tmp_path / "cache", budget_bytes=1 << 30)
    paths: list[Path] = []

    async def fetch() -> None:
        paths.append(await cache.fetch("snap-5"))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(fetch)
    assert cache.fetches == 1
    assert paths == [cache.path("snap-5")] * 6
    assert digests(paths[0]) == digests(source)


async def test_the_cache_evicts_least_recently_used_bundles_but_never_held_ones(
    store: ObjectStore, tmp_path: Path
) -> None:
    size = 256 << 10
    for name in ("a", "b", "c", "d", "e"):
        directory = tmp_path / "sources" / name
        directory.mkdir(parents=True)
        (directory / "memory").write_bytes(os.urandom(size))
        await upload_bundle(store, f"snap-{name}", directory, part_bytes=PART)
    cache = HostCache(store, tmp_path / "cache", budget_bytes=3 * size + size // 2)
    for name in ("a", "b", "c"):
        await cache.fetch(f"snap-{name}")
    await cache.fetch("snap-a")  # used again: now b is the least recently used
    await cache.fetch("snap-d")
    assert [cache.has(f"snap-{n}") for n in "abcd"] == [True, False, True, True]

    cache.hold("snap-c", "i-fork-1")  # a fork's disks are backed by it
    async with cache.use("snap-d"):  # in use right now
        await cache.fetch("snap-e")
    assert [cache.has(f"snap-{n}") for n in "acde"] == [False, True, True, True]
    cache.release("snap-c", "i-fork-1")

    # A fetch broken off long ago, of a bundle the store has dropped since, goes too.
    abandoned = tmp_path / "cache" / ".partial" / "snap-gone"
    abandoned.mkdir()
    os.utime(abandoned, (1, 1))
    cache.evict()
    assert not abandoned.exists()
