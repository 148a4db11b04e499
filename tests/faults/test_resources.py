"""Resources that run out or hang: a data dir that is full, a registry that stalls.

Disk full: a second worker whose data dir is a small tmpfs joins the stack; the first host
is drained so that volumes land on the small one. A full disk refuses what it cannot hold
with a clear error and leaves nothing half-made, and once space is freed the host serves.

Stalled registry: a loopback "registry" that accepts and never answers (or answers headers
and never the body). A create or a pull of its image ends in a clear error within the
worker's bound for asking a registry (``worker.images.Timeouts.resolve_s``), leaving
nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ids import derived_id
from tests.faults.report import REPORT
from tests.faults.stack import Answer, Stack, deadline_loop
from tests.support.fleet import WorkerProcess
from tests.support.stalling_registry import StallingRegistry
from worker.images import Timeouts

pytestmark = pytest.mark.vm

MIB = 1 << 20
TMPFS_MIB = 128
DISK = "Disk full"
REGISTRY = "Stalled registry"


@contextlib.contextmanager
def small_host(stack: Stack, test_assets: Path) -> Iterator[WorkerProcess]:
    """A worker whose data dir is a tmpfs of TMPFS_MIB, live in the stack's fleet."""
    worker = WorkerProcess(
        ",".join(stack.cluster.urls), stack.prefix, test_assets, VMFLEET_REPLICAS="3"
    )
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(worker.data_dir)],
        check=True,
    )
    try:
        worker.start()
        stack.wait_host_live(worker.host_id)
        yield worker
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.terminate()
        worker.cleanup()
        subprocess.run(["umount", str(worker.data_dir)], check=False)
        with contextlib.suppress(OSError):
            worker.data_dir.rmdir()


def fill(directory: Path, leave_bytes: int) -> Path:
    """Take all but ``leave_bytes`` of the file system's free space."""
    filler = directory / "filler"
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "ab") as out:
        size = os.fstat(out.fileno()).st_size
        os.posix_fallocate(out.fileno(), size, max(free - leave_bytes, 1))
    return filler


def host_disk_free(stack: Stack, host: str) -> int | None:
    answer = stack.call("GET", "/hosts")
    for record in answer.body if answer.status == 200 else []:
        if record.get("id") == host:
            return int(record["disk_free_bytes"])
    return None


def wait_heartbeat(stack: Stack, host: str, *, below: int | None = None, above: int = 0) -> None:
    """Until the host's heartbeat shows its disk as it now is."""
    with deadline_loop(60, f"host {host}'s heartbeat to show its disk") as tick:
        while True:
            free = host_disk_free(stack, host)
            if free is not None and free > above and (below is None or free < below):
                return
            tick()


def nothing_left(stack: Stack, host: WorkerProcess, *, instances: int | None, volumes: int) -> None:
    """No half-made guest, volume or image on the host: a guest directory for each of its
    records (``instances`` of them, when given), ``volumes`` volume directories."""
    guests = sorted(p.name for p in (host.data_dir / "guests").glob("*"))
    records = sorted(r["id"] for r in stack.instances() if r.get("host") == host.host_id)
    assert records == guests, f"records {records}, guest directories {guests}"
    assert instances is None or len(guests) == instances, guests
    made = sorted(p.name for p in (host.data_dir / "volumes").glob("*"))
    assert len(made) == volumes, f"volume directories {made}"
    assert not list((host.data_dir / "images" / "tmp").glob("*")), "a pull left its work dir"
    disks = host.data_dir / "images" / "disks"
    partial = [d.name for d in disks.glob("*") if not (d / "metadata.json").exists()]
    assert not partial, f"image disks without metadata: {partial}"


def error_shape(answer: Answer) -> str:
    assert answer.status is not None and answer.status >= 400, answer.short()
    assert isinstance(answer.body, dict) and set(answer.body) == {"code", "message"}, answer.body
    return f"{answer.status} {answer.body['code']}: {answer.body['message']}"


def test_disk_full(stack: Stack, test_assets: Path) -> None:
    lines = REPORT.sections.setdefault(DISK, [])
    lines += [
        f"A second worker joins with its data dir on a {TMPFS_MIB} MiB tmpfs; the first host "
        "is drained, so that volumes are placed on the small one. The disk is filled with a "
        "file (`posix_fallocate`) to all but a few hundred KiB, then freed again.",
        "",
    ]
    main = stack.host
    stack.ok("POST", f"/hosts/{main}/drain", json={"reason": "disk-full test"})
    try:
        with small_host(stack, test_assets) as small:
            _disk_full_on(stack, small, lines)
    finally:
        print("\n".join(lines))
        stack.ok("DELETE", f"/hosts/{main}/drain")


test_disk_full.report_section = DISK  # type: ignore[attr-defined]


def _disk_full_on(stack: Stack, small: WorkerProcess, lines: list[str]) -> None:
    host = small.host_id
    body = stack.create_body("small", host=host, overlay_size="16MB")

    # 1. Full before anything is asked: the create and the volume are both refused by
    # placement (the heartbeat says how much disk is left), before anything is made.
    filler = fill(small.data_dir, leave_bytes=256 << 10)
    wait_heartbeat(stack, host, below=4 * MIB, above=-1)
    refused = stack.call("POST", "/instances", json=body)
    lines.append(f"- create on the full host: `{error_shape(refused)}`")
    assert refused.status == 503 and refused.code == "no_capacity", refused.body
    volume = stack.call("POST", "/volumes", json={"name": "full", "size_gb": 1})
    lines.append(f"- volume create on the full host: `{error_shape(volume)}`")
    assert (volume.status, volume.body["code"]) == (503, "no_capacity"), volume.body
    nothing_left(stack, small, instances=0, volumes=0)
    filler.unlink()

    # 2. Full while a create runs: its disks (image, overlay, config) find no space.
    wait_heartbeat(stack, host, above=64 * MIB)
    key = f"disk-full-{secrets.token_hex(4)}"
    guest = small.data_dir / "guests" / derived_id("instance", key)
    call = stack.in_flight("POST", "/instances", key=key, json=body)
    deadline = time.monotonic() + 60
    while not (guest / "metadata.json").exists():  # the create has begun: fill the disk
        assert not call.done(), f"the create ended before it made anything: {call.result()}"
        assert time.monotonic() < deadline, "the create never started"
        time.sleep(0.005)
    filler = fill(small.data_dir, leave_bytes=64 << 10)
    failed = call.result()
    lines.append(f"- create while the disk fills up: `{error_shape(failed)}`")
    assert (failed.status, failed.body["code"]) == (507, "insufficient_storage"), failed.body
    assert "no space left on device" in failed.body["message"].lower(), failed.body
    nothing_left(stack, small, instances=0, volumes=0)
    filler.unlink()

    # 3. Space again: the host serves as before.
    wait_heartbeat(stack, host, above=64 * MIB)
    created = stack.ok("POST", "/instances", json=body)
    assert created["state"] == "Running" and created["host"] == host, created
    # (No volume here: the smallest, 1 GB, is more than this 128 MiB host can promise.)
    lines.append(
        "- once the filler is removed: create → 201 Running; "
        "no guest, volume or image work dir was left by the failures"
    )
    nothing_left(stack, small, instances=1, volumes=0)
    stack.ok("DELETE", f"/instances/{created['id']}")
    nothing_left(stack, small, instances=0, volumes=0)


def test_stalled_registry(stack: Stack) -> None:
    lines = REPORT.sections.setdefault(REGISTRY, [])
    lines += [
        "Two registries on loopback: one accepts connections and never answers, one answers "
        "every request with headers that promise a body it never sends. The worker bounds "
        f"every registry query (`skopeo inspect`) at {Timeouts().resolve_s:g} s "
        "(`worker.images.Timeouts.resolve_s`), below the gateway's 55 s command timeout.",
        "",
    ]
    silent, headers = StallingRegistry("silent"), StallingRegistry("headers")
    silent.start()
    headers.start()
    try:
        _stalled(stack, silent, headers, lines)
    finally:
        print("\n".join(lines))
        silent.stop()
        headers.stop()


test_stalled_registry.report_section = REGISTRY  # type: ignore[attr-defined]


def _stalled(
    stack: Stack, silent: StallingRegistry, headers: StallingRegistry, lines: list[str]
) -> None:
    images = {
        "accepts, never answers": f"{silent.address}/stall:latest",
        "answers headers, never the body": f"{headers.address}/stall:latest",
    }
    started = time.monotonic()
    creates = {
        how: stack.in_flight(
            "POST",
            "/instances",
            json=stack.create_body(f"stall-{i}", image=image),
            timeout_s=120,
        )
        for i, (how, image) in enumerate(images.items())
    }
    pulling = f"{silent.address}/pulled:latest"  # not the creates' (they would see it pending)
    pulled = stack.call("POST", "/images", json={"name": pulling})
    assert pulled.status == 202 and pulled.body["status"] in ("pending", "pulling"), pulled.body
    for how, call in creates.items():
        answer = call.result()
        lines.append(
            f"- create, registry {how}: `{error_shape(answer)}` "
            f"({time.monotonic() - started:.0f} s after it was sent)"
        )
        assert (answer.status, answer.code) == (502, "registry_unavailable"), answer.body
    name = urllib.parse.quote(pulling, safe="")
    with deadline_loop(120, "the stalled pull to fail") as tick:
        while (record := stack.ok("GET", f"/images/{name}"))["status"] != "failed":
            tick()
    lines.append(f"- `POST /images` of it: 202 `pending`, then `failed`: {record['error']}")
    assert record["error"]
    stack.ok("DELETE", f"/images/{name}")
    assert silent.accepted and headers.accepted, "skopeo never reached the registries"
    # Nothing left: no record, no guest, no pull under way or its work dir, no skopeo.
    assert not [r for r in stack.instances() if r["name"].startswith("stall-")]
    nothing_left(stack, stack.worker, instances=None, volumes=1)
    addresses = (silent.address.encode(), headers.address.encode())
    skopeo = [
        p.parent.name
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if b"skopeo" in (line := _read(p)) and any(a in line for a in addresses)
    ]
    assert not skopeo, f"skopeo still running: {skopeo}"
    lines.append("- afterwards: no instance record, guest directory, pull work dir or skopeo left")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
