"""The supervision loop's CPU cost: 1,000 instances on one host, an http check every second.

The worker's real health loop (``worker.health.supervise_health``) runs over a real
``HostEngine`` whose table holds ``--instances`` Running records (no VMs: each record has
a guest directory, so a record write costs what it costs a worker) with an http check
every ``--interval`` seconds on a mapped port, as a user-mode host probes its guests. Every
check is answered by one small HTTP server in a process of its own (its CPU is not counted):
the status line of a 200, as a guest's web server would. The worker's own supervisor
(restart schedule) and expiry loops run beside it, as in ``worker/daemon.py``.

Measured: this process's CPU time (user + system, ``getrusage``) over ``--seconds`` of
wall time after a warm-up, as a share of one core, and per check answered; the checks the
server answered in the same window, and how many instances ended up not healthy (a check
that timed out because the loop fell behind would show there). Baseline, in the same run
against the same server: the CPU of the bare check, a blocking connect / GET / read the
status line / close done ``--floor-checks`` times in a plain loop (what the kernel and the
socket calls cost, with no scheduling, no timeout and no counting at all). Not counted:
publishing the record writes to NATS (the worker queues them to its publisher; steady
health writes a record at most every 30 s per instance, :data:`worker.health.STEADY_SAVE_S`).
Goal ([3/6]): under 5 % of one core.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Summary
from schemas.api import InstanceState, PortMapping
from schemas.messages import HealthCheckSpec, HealthState
from tests.support.gateway import instance_record
from worker.drivers.qemu import QemuDriver
from worker.engine import HostEngine
from worker.expiry import reap_expired
from worker.health import supervise_health
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, LocalInstance, OpContext
from worker.storage import Storage
from worker.supervisor import supervise_restarts
from worker.volumes import VolumeStore

GUEST_PORT = 8080

#: The answering server, run with ``python -c``: counts requests, prints the count when
#: asked (a line on stdin), answers each connection with a 200 and closes it.
SERVER = r"""
import asyncio, os, sys
served = 0
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
async def answer(reader, writer):
    global served
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        served += 1
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # a check cut short when the benchmark stops
    writer.close()
async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            os._exit(0)  # checks still in flight end with the process, not in tracebacks
        print(served, flush=True)
asyncio.run(main())
"""


class AnsweringServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def served(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def make_engine(data: Path) -> HostEngine:
    """A real engine on a scratch data dir; nothing here boots (no kernel needed)."""
    ctx = OpContext(
        host_id="bench-supervision",
        storage=Storage(data),
        driver=QemuDriver(),
        images=ImageCache(data / "images"),
        volumes=VolumeStore(data, "bench-supervision"),
        boot=BootAssets(kernel=data / "none", initrd=data / "none", accel="tcg"),
    )
    return HostEngine(ctx)


def fill(engine: HostEngine, count: int, host_port: int, interval_s: float) -> None:
    check = HealthCheckSpec(
        type="http", port=GUEST_PORT, interval_s=interval_s, timeout_s=interval_s
    )
    opened = datetime.now(UTC)
    for n in range(count):
        instance_id = f"sup{n:05d}"
        record = instance_record(
            instance_id,
            f"svc-{n}",
            engine.ctx.host_id,
            state=InstanceState.RUNNING,
            port_mappings=[PortMapping(guest_port=GUEST_PORT, host_port=host_port)],
            health_check=check,
            health=HealthState(window_started_at=opened),
        )
        guest = engine.ctx.storage.create_guest(instance_id)
        guest.write(guest.metadata, record)
        # The table a worker fills from its creates and its recovery; no VMM behind it.
        engine._instances[instance_id] = LocalInstance(record=record, guest=guest)


def floor_per_check(server: AnsweringServer, count: int) -> float:
    """CPU seconds of one bare check: blocking socket calls in a loop, nothing else."""
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "User-Agent: vmfleet-health\r\nConnection: close\r\n\r\n"
    ).encode()
    before = cpu_seconds()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(request)
            head = sock.recv(8192)
        assert head.startswith(b"HTTP/1.1 200 "), head
    return (cpu_seconds() - before) / count


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def not_healthy(engine: HostEngine) -> int:
    return sum(1 for record in engine.records() if record.health.status != "healthy")


async def measure(
    engine: HostEngine, server: AnsweringServer, warmup_s: float, seconds: float
) -> dict[str, float]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervise_health, engine)
        tg.start_soon(supervise_restarts, engine)
        tg.start_soon(reap_expired, engine)
        await anyio.sleep(warmup_s)
        served_before = await anyio.to_thread.run_sync(server.served)
        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        await anyio.sleep(seconds)
        cpu, wall = cpu_seconds() - cpu_before, time.monotonic() - wall_before
        served = await anyio.to_thread.run_sync(server.served) - served_before
        tg.cancel_scope.cancel()
    return {"cpu_s": cpu, "wall_s": wall, "checks": served, "not_healthy": not_healthy(engine)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between checks")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured wall time")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--floor-checks", type=int, default=5000, help="bare checks timed")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
    server = AnsweringServer()
    try:
        floor = floor_per_check(server, args.floor_checks)
        engine = make_engine(work / "data")
        fill(engine, args.instances, server.port, args.interval)
        found = anyio.run(measure, engine, server, args.warmup, args.seconds)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    share = found["cpu_s"] / found["wall_s"]
    per_check = found["cpu_s"] / max(found["checks"], 1)
    expected = args.instances * found["wall_s"] / args.interval
    print(
        f"{args.instances} instances, http check every {args.interval:g}s, "
        f"measured {found['wall_s']:.1f}s"
    )
    print(
        f"CPU {found['cpu_s']:.2f}s = {share * 100:.2f}% of one core (goal < 5%); "
        f"checks {found['checks']:.0f} ({found['checks'] / expected * 100:.0f}% of "
        f"{expected:.0f} due); not healthy at the end: {found['not_healthy']:.0f}"
    )
    print(
        f"CPU per check {per_check * 1e6:.1f} µs; baseline (same run) {floor * 1e6:.1f} µs for "
        f"a bare blocking connect/GET/close: ratio {per_check / floor:.2f}x"
    )
    if args.json:
        summary = Summary(
            "supervision",
            {"instances": args.instances, "interval_s": args.interval, "seconds": args.seconds},
        )
        summary.add(
            "health loop CPU, share of one core",
            round(share * 100, 2),
            unit="%",
            goal="< 5% of one core",
            met=share < 0.05,
            issue="3/6",
        )
        summary.add(
            "CPU per check",
            round(per_check * 1e6, 1),
            unit="µs",
            baseline=round(floor * 1e6, 1),
            baseline_name="bare blocking connect/GET/close",
            ratio=round(per_check / floor, 2),
        )
        summary.add("checks answered per second", round(found["checks"] / found["wall_s"], 1))
        summary.emit()


if __name__ == "__main__":
    main()
