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
import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Summary
from cli.embedded_nats import NatsServerProcess
from natsbus import Layout, provision
from schemas.subjects import Subjects
from worker.transfer import HostCache, delete_bundle, open_store, upload_bundle

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
                await store.put(f"plain/{path.name}", f)  # type: ignore[arg-type]
        found["plain_put_s"] = time.monotonic() - started
        started = time.monotonic()
        out = work / "plain"
        out.mkdir()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            with (out / path.name).open("wb") as f:
                await store.get(f"plain/{path.name}", writeinto=f)  # type: ignore[arg-type]
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
