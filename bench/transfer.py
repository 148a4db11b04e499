"""Moving a snapshot's bytes between hosts: plain NATS Object Store vs worker.transfer.

The same file (a memory image stand-in: random bytes, so nothing compresses or is
skipped as zeros; ``--zero-share`` makes part of it zeros, as a guest's untouched memory
is) is sent and received twice through one nats-server (JetStream on disk, loopback):

- plain: ``object_store.put`` of the file (nats-py's 128 KiB chunks, one ack per chunk),
  then ``get`` into a file;
- vmfleet: ``upload_bundle`` (8 MiB parts, 512 KiB chunks, 4 parts in flight, zero parts
  not sent) then a ``HostCache`` fetch (parts in parallel, every part and then every
  file's SHA-256 checked, renamed into place).

Both directions are timed, and MB/s is the file's size over the time. ``transfer_comparison``
is what bench/fork.py calls for its cross-host part; run alone:

    .venv/bin/python bench/transfer.py --size-mb 256 --json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec
import nats
from nats.aio.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Summary
from cli.embedded_nats import NatsServerProcess
from natsbus import Layout, provision
from schemas.clock import utc_now
from schemas.messages import Create, Delete, FetchSnapshot, PublishSnapshot
from schemas.snapshots import ForkSource
from schemas.subjects import Subjects
from schemas.transfers import snapshot_bundle
from worker.drivers.base import VmSpec
from worker.engine import HostEngine
from worker.images import ImageCache
from worker.lifecycle.context import OpContext
from worker.snapshots.store import SnapshotStore
from worker.storage import Storage
from worker.transfer import HostCache, delete_bundle, open_store, upload_bundle
from worker.transfer.snapshots import SnapshotTransfers
from worker.volumes import VolumeStore

MB = 1_000_000


def make_memory_file(path: Path, size: int, zero_share: float = 0.0) -> None:
    """``size`` bytes: random, but for a ``zero_share`` of 8 MiB stretches left zero."""
    stretch = 8 << 20
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, stretch):
            if (offset // stretch) % 100 >= zero_share * 100:
                f.seek(offset)
                f.write(os.urandom(min(stretch, size - offset)))


async def transfer_comparison(
    nats_url: str, prefix: str, source: Path, work: Path
) -> dict[str, float]:
    """Seconds and MB/s of both ways for the files in the directory ``source``."""
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    nc = await nats.connect(nats_url, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=30)
        subjects = Subjects(prefix)
        await provision(js, subjects, Layout())
        store = await open_store(js, subjects)
        found: dict[str, float] = {"bytes": size}

        started = time.monotonic()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            with path.open("rb") as f:
                await store.put(f"plain/{path.name}", f)
        found["plain_put_s"] = time.monotonic() - started
        started = time.monotonic()
        out = work / "plain"
        out.mkdir()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            with (out / path.name).open("wb") as f:
                await store.get(f"plain/{path.name}", writeinto=f)
        found["plain_get_s"] = time.monotonic() - started

        started = time.monotonic()
        await upload_bundle(store, "bench-snap", source)
        found["vmfleet_put_s"] = time.monotonic() - started
        cache = HostCache(store, work / "cache", budget_bytes=1 << 40)
        started = time.monotonic()
        await cache.fetch("bench-snap")
        found["vmfleet_get_s"] = time.monotonic() - started
        await delete_bundle(store, "bench-snap")
        for key in ("plain_put", "plain_get", "vmfleet_put", "vmfleet_get"):
            found[f"{key}_mb_s"] = size / MB / found[f"{key}_s"]
        return found
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=256, help="the memory file's size")
    parser.add_argument("--zero-share", type=float, default=0.0, help="share left as zeros")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    server = NatsServerProcess(work / "nats")
    try:
        server.start()
        server.wait_ready()
        source = work / "snapshot"
        source.mkdir()
        make_memory_file(source / "memory", args.size_mb << 20, args.zero_share)
        found = anyio.run(transfer_comparison, server.url, "bench", source, work)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    mb = found["bytes"] / MB
    for way in ("put", "get"):
        plain, ours = found[f"plain_{way}_mb_s"], found[f"vmfleet_{way}_mb_s"]
        print(
            f"{way} {mb:.0f} MB: plain object store {plain:.0f} MB/s "
            f"({found[f'plain_{way}_s']:.2f}s), worker.transfer {ours:.0f} MB/s "
            f"({found[f'vmfleet_{way}_s']:.2f}s, checksums included)"
        )
    if args.json:
        summary = Summary("transfer", {"size_mb": args.size_mb, "zero_share": args.zero_share})
        for way in ("put", "get"):
            summary.add(
                f"transfer {way}, worker.transfer",
                round(found[f"vmfleet_{way}_mb_s"], 1),
                unit="MB/s",
                baseline=round(found[f"plain_{way}_mb_s"], 1),
                baseline_name="plain NATS Object Store",
                ratio=round(found[f"vmfleet_{way}_mb_s"] / found[f"plain_{way}_mb_s"], 2),
                issue="6/6",
            )
        summary.emit()


if __name__ == "__main__":
    main()


async def cross_host_fork(
    engine: HostEngine, image: str, snapshot_id: str, work: Path, summary: Summary
) -> None:
    """bench/fork.py's cross-host part: ``snapshot_id`` (on ``engine``'s host) forked to
    Running on a second host in this process (its own data dir and its own build of the
    image), transfer included, next to the same bytes through a plain Object Store put
    and get plus the same-host restore that bench/fork.py measured. Goal (issue 18):
    within the restore plus the bare transfer plus 20 %."""
    server = NatsServerProcess(work / "nats")
    server.start()
    try:
        server.wait_ready()
        nc = await nats.connect(server.url, max_reconnect_attempts=0)
        try:
            await _cross_host_fork(nc, engine, image, snapshot_id, work, summary)
        finally:
            await nc.close()
    finally:
        server.stop()


async def _cross_host_fork(
    nc: Client, engine: HostEngine, image: str, snapshot_id: str, work: Path, summary: Summary
) -> None:
    js = nc.jetstream(timeout=30)
    subjects = Subjects("benchfork")
    await provision(js, subjects, Layout())
    store = await open_store(js, subjects)
    a = engine.ctx
    b = OpContext(
        host_id="bench-b",
        storage=Storage(work / "data-b"),
        driver=a.driver,
        images=ImageCache(work / "data-b" / "images"),
        volumes=VolumeStore(work / "data-b", "bench-b"),
        boot=a.boot,
    )
    other = HostEngine(b)
    await b.images.pull(image)  # both hosts have the image, as a fleet's do
    snapshots_a, snapshots_b = (
        SnapshotStore(a.storage.guests.parent),
        SnapshotStore(work / "data-b"),
    )
    sender = SnapshotTransfers(
        store, HostCache(store, work / "cache-a", 1 << 40), snapshots_a, None, "bench"
    )
    fetcher = SnapshotTransfers(
        store, HostCache(store, work / "cache-b", 1 << 40), snapshots_b, None, "bench-b"
    )

    # The bare transfer: the same files (the snapshot and the image disk its memory ran
    # on), put and got through the plain object store.
    directory = snapshots_a.directory(snapshot_id)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    saved = msgspec.json.decode((directory / "vm" / "vm.json").read_bytes(), type=VmSpec)
    files += [Path(d.path) for d in saved.disks if d.id == "root"]
    size = sum(p.stat().st_size for p in files)
    plain = work / "plain"
    plain.mkdir()
    started = time.monotonic()
    for n, path in enumerate(files):
        with path.open("rb") as f:
            await store.put(f"plain/{n}", f)
        with (plain / str(n)).open("wb") as out:
            await store.get(f"plain/{n}", writeinto=out)
    bare_s = time.monotonic() - started

    bundle = snapshot_bundle(snapshot_id)
    started = time.monotonic()
    await sender.publish(
        PublishSnapshot(id="p", issued_at=utc_now(), snapshot_id=snapshot_id, bundle=bundle)
    )
    sent_s = time.monotonic() - started
    await fetcher.fetch(
        FetchSnapshot(id="f", issued_at=utc_now(), snapshot_id=snapshot_id, bundle=bundle)
    )
    fetched_s = time.monotonic() - started - sent_s
    fork = _fork_create(image, snapshot_id)
    await other.execute(fork)
    cross_s = time.monotonic() - started
    await other.execute(Delete(id="d-far", instance_id=fork.instance_id, issued_at=utc_now()))

    restore_s = next(
        (r.baseline for r in summary.results if r.baseline_name.startswith("restore")), None
    )
    assert isinstance(restore_s, float)
    budget = (restore_s + bare_s) * 1.2
    print(
        f"cross-host fork -> Running {cross_s:.2f} s (send {sent_s:.2f} s, fetch "
        f"{fetched_s:.2f} s, fork {cross_s - sent_s - fetched_s:.2f} s) for {size / MB:.0f} MB; "
        f"bare put+get {bare_s:.2f} s; restore {restore_s:.2f} s; goal < {budget:.2f} s"
    )
    summary.add(
        "cross-host fork -> Running, transfer included",
        round(cross_s, 2),
        unit="s",
        baseline=round(restore_s + bare_s, 2),
        baseline_name="restore + bare Object Store put and get of the same bytes",
        ratio=round(cross_s / (restore_s + bare_s), 3),
        goal="< 1.2x",
        met=cross_s < budget,
        issue="18",
    )


def _fork_create(image: str, snapshot_id: str) -> Create:
    return Create(
        id="c-far",
        instance_id="benchfar0000000000000001",
        issued_at=utc_now(),
        name="far",
        image=image,
        size_bytes=256 << 20,
        overlay_bytes=1 << 30,
        vcpus=1,
        cmd=["/bin/sh", "-c", "sleep 1000"],
        fork=ForkSource(snapshot_id=snapshot_id),
    )
