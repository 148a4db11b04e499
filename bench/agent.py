"""exec and cp through the whole path, next to floors measured in the same run.

The path: hypeman's SDK (a client process of its own) → `vmfleet gateway` (a process) →
NATS → the session relay and agent hub of a worker (this process, built as the daemon
builds it) → the guest agent over its virtio-serial channel → the guest (QEMU, TCG here).

Floors, same run, same guests:
- exec: the same ``/bin/true`` session opened by the worker on the agent channel itself
  (no gateway, no NATS), plus one NATS request/reply round trip; a pure no-op (``stat /``)
  on the channel for reference;
- cp: ``cat`` of the same 64 MiB file through the raw channel (download), and
  ``cat > file`` fed 64 MiB (upload), both from the worker.
Then 100 concurrent execs across the instances. Goals (issue 14): exec p50 within 2x the
floor and under 30 ms; cp at least half the raw channel's throughput; no error under
concurrency. Notes: the agent binary's size and idle RSS, and boot time with and without
the agent.

    python bench/agent.py [--instances 10] [--execs 200] [--file-mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from bench.support import ASSETS, Summary, pct
from cli.embedded_nats import NatsServerProcess
from schemas.clock import utc_now
from schemas.codec import encode
from schemas.messages import Delete
from schemas.subjects import Subjects
from tests.support.gateway import host_record
from tests.support.gateway_process import GatewayProcess
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry
from tests.worker.conftest import create_command, make_context
from worker.accel import choose_accel
from worker.agent import AgentHub, Frame, track_instance
from worker.drivers.qemu import qemu_binary
from worker.engine import HostEngine
from worker.guest import DEFAULT_AGENT, ensure_initrd, ensure_kernel
from worker.lifecycle.context import BootAssets
from worker.metrics import WorkerMetrics
from worker.sessions import EngineSessionHost, SessionServer

MIB = 1 << 20
HOST = "test-host"  # make_context's host id


# -- the client side: a process of its own, as a user's program would be ----------------------


def client_main(argv: list[str]) -> None:
    """``--client MODE BASE_URL TOKEN ARGS...``: print one JSON result line."""
    from hypeman import AsyncHypeman, Hypeman
    from hypeman.lib import cp_from_instance, cp_to_instance, exec, exec_async

    mode, base_url, token, *rest = argv
    client = Hypeman(api_key=token, base_url=base_url, max_retries=0)
    if mode == "exec":
        instance, count = rest[0], int(rest[1])
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            result = exec(client, instance, ["/bin/true"])
            samples.append(time.perf_counter() - started)
            assert result.exit_code == 0, result
        print(json.dumps(samples))
    elif mode in ("up", "down"):
        instance, local, remote = rest
        started = time.perf_counter()
        if mode == "up":
            cp_to_instance(client, instance, local, remote)
        else:
            cp_from_instance(client, instance, remote, local)
        print(json.dumps(time.perf_counter() - started))
    elif mode == "concurrent":
        per, instances = int(rest[0]), rest[1:]

        async def run() -> dict[str, Any]:
            aclient = AsyncHypeman(api_key=token, base_url=base_url, max_retries=0)
            errors: list[str] = []

            async def one(instance: str, i: int) -> None:
                try:
                    result = await exec_async(aclient, instance, ["/bin/echo", str(i)])
                    if (result.exit_code, result.output) != (0, f"{i}\n".encode()):
                        errors.append(f"{instance}: {result}")
                except Exception as exc:
                    errors.append(f"{instance}: {exc!r}")

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for instance in instances:
                    for i in range(per):
                        tg.start_soon(one, instance, i)
            return {"seconds": time.perf_counter() - started, "errors": errors}

        print(json.dumps(anyio.run(run)))


async def run_client(*args: str) -> Any:
    done = await anyio.run_process([sys.executable, __file__, "--client", *args], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client {args[0]} failed: {done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


# -- floors on the agent channel -----------------------------------------------------------------


async def agent_exec(hub: AgentHub, instance: str, command: list[str], stdin: bytes = b"") -> bytes:
    """One exec on the agent channel, as the relay opens it; the output."""
    session = await hub.open_session(instance, "exec")
    output = bytearray()
    try:
        await session.send(Frame(True, json.dumps({"command": command, "tty": False}).encode()))
        for start in range(0, len(stdin), 64 * 1024):
            await session.send(Frame(False, stdin[start : start + 64 * 1024]))
        await session.send_eof()
        while True:
            try:
                frame = await session.receive()
            except anyio.EndOfStream:
                return bytes(output)
            if not frame.text:
                output += frame.data
    finally:
        await session.aclose()


async def agent_stat(hub: AgentHub, instance: str) -> None:
    session = await hub.open_session(instance, "stat")
    try:
        await session.send(Frame(True, b'{"path":"/","follow_links":false}'))
        await session.receive()
    finally:
        await session.aclose()


async def timed(count: int, call: Any, *args: Any) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call(*args)
        samples.append(time.perf_counter() - started)
    return samples


async def nats_round_trips(nc: Client, subjects: Subjects, count: int) -> list[float]:
    subject = subjects.host_query(HOST, "benchping")

    async def pong(msg: Msg) -> None:
        await msg.respond(b"pong")

    subscription = await nc.subscribe(subject, cb=pong)
    try:
        return await timed(count, nc.request, subject, b"ping", 5)
    finally:
        await subscription.unsubscribe()


# -- the stack ---------------------------------------------------------------------------------


async def boot_assets(agent: Path | None, data_dir: Path) -> BootAssets:
    kernel = await ensure_kernel(ASSETS)
    initrd = await ensure_initrd(data_dir, kernel)
    # Its own probe state: the shared assets dir's belongs to whoever else boots guests here.
    accel = await choose_accel(data_dir, qemu=qemu_binary(), kernel=kernel.bzimage, initrd=initrd)
    return BootAssets(kernel=kernel.bzimage, initrd=initrd, accel=accel, agent=agent)


async def heartbeat(js: Any, subjects: Subjects) -> None:
    hosts = await js.key_value(subjects.hosts_bucket)
    while True:
        await hosts.put(HOST, encode(host_record(HOST)))
        await anyio.sleep(2)


async def bench(args: argparse.Namespace, work: Path, summary: Summary) -> None:
    registry = LocalRegistry(work / "registry")
    registry.start()
    server = NatsServerProcess(work / "nats")
    server.start()
    prefix = "bench" + secrets.token_hex(3)
    gateway = GatewayProcess(server.url, prefix)
    try:
        server.wait_ready()
        image = push_image(
            build_busybox_image(work / "oci" / "layout"), registry.address, "busybox:latest"
        )
        gateway.start()
        gateway.wait_ready()
        nc = await nats.connect(server.url)
        try:
            await measure(args, work, summary, nc, Subjects(prefix), gateway, image)
        finally:
            await nc.close()
    finally:
        gateway.stop()
        gateway.cleanup()
        server.stop()
        registry.stop()


async def measure(
    args: argparse.Namespace,
    work: Path,
    summary: Summary,
    nc: Client,
    subjects: Subjects,
    gateway: GatewayProcess,
    image: str,
) -> None:
    boot = await boot_assets(DEFAULT_AGENT, work / "assets")
    hub = AgentHub()
    ctx = make_context(work / "host", boot)
    ctx.on_transition = lambda inst, previous: track_instance(hub, ctx.driver, inst)
    ctx.on_removed = lambda record: hub.detach(record.id, "the instance was deleted")
    ctx.agent = hub
    engine = HostEngine(ctx)
    js = nc.jetstream()
    records = await js.key_value(subjects.instances_bucket)
    server = SessionServer(
        nc, subjects, HOST, EngineSessionHost(engine), hub, WorkerMetrics(CollectorRegistry())
    )
    instances: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.run)
        tg.start_soon(heartbeat, js, subjects)
        await tg.start(server.run)
        try:
            boots = []
            for n in range(args.instances):
                cmd = create_command(image, cmd=["sleep", "100000"], name=f"b{n}")
                started = time.perf_counter()
                await engine.execute(cmd)
                await hub.wait_ready(cmd.instance_id, 300)
                boots.append(time.perf_counter() - started)
                instances.append(cmd.instance_id)
                await records.put(cmd.instance_id, encode(engine.get(cmd.instance_id)))
            summary.notes.append(
                f"{args.instances} guests booted to agent-ready, median "
                f"{statistics.median(boots):.2f}s each (one at a time, TCG)"
            )
            await anyio.sleep(4)  # the gateway's view catches up with the records
            await run_measurements(args, work, summary, nc, subjects, gateway, hub, instances)
            await boot_without_agent(work, image, summary, boots)
        finally:
            with anyio.CancelScope(shield=True):
                for instance in instances:
                    await engine.execute(
                        Delete(id=f"del-{instance}", instance_id=instance, issued_at=utc_now())
                    )
            tg.cancel_scope.cancel()


async def run_measurements(
    args: argparse.Namespace,
    work: Path,
    summary: Summary,
    nc: Client,
    subjects: Subjects,
    gateway: GatewayProcess,
    hub: AgentHub,
    instances: list[str],
) -> None:
    first = instances[0]
    base, token = gateway.base_url, gateway.token
    # -- exec round trip -------------------------------------------------------------------------
    await run_client("exec", base, token, first, "10")  # warm-up
    sdk = await run_client("exec", base, token, first, str(args.execs))
    direct = await timed(args.execs, agent_exec, hub, first, ["/bin/true"])
    noop = await timed(args.execs, agent_stat, hub, first)
    bus = await nats_round_trips(nc, subjects, args.execs)
    floor = pct(direct, 0.5) + pct(bus, 0.5)
    p50, p99 = pct(sdk, 0.5), pct(sdk, 0.99)
    summary.add(
        "exec /bin/true p50 (SDK)",
        round(p50 * 1000, 2),
        unit="ms",
        baseline=round(floor * 1000, 2),
        baseline_name="agent-channel exec + NATS request/reply p50",
        ratio=round(p50 / floor, 2),
        goal="<= 2x floor and < 30 ms",
        met=p50 <= 2 * floor and p50 < 0.030,
    )
    summary.add("exec /bin/true p99 (SDK)", round(p99 * 1000, 2), unit="ms")
    summary.add("agent-channel exec /bin/true p50", round(pct(direct, 0.5) * 1000, 2), unit="ms")
    summary.add("agent-channel no-op (stat /) p50", round(pct(noop, 0.5) * 1000, 2), unit="ms")
    summary.add("NATS request/reply p50", round(pct(bus, 0.5) * 1000, 3), unit="ms")
    # -- cp throughput ---------------------------------------------------------------------------
    size = args.file_mib * MIB
    local = work / "big.bin"
    local.write_bytes(os.urandom(size))
    up_s = await run_client("up", base, token, first, str(local), "/tmp/up.bin")
    down_dir = work / "down"
    down_s = await run_client("down", base, token, first, str(down_dir), "/tmp/up.bin")
    assert (down_dir / "up.bin").read_bytes() == local.read_bytes(), "cp corrupted the file"
    started = time.perf_counter()
    raw_down = await agent_exec(hub, first, ["cat", "/tmp/up.bin"])
    raw_down_s = time.perf_counter() - started
    assert len(raw_down) == size
    del raw_down
    started = time.perf_counter()
    await agent_exec(hub, first, ["/bin/sh", "-c", "cat > /tmp/raw.bin"], local.read_bytes())
    raw_up_s = time.perf_counter() - started
    await agent_exec(hub, first, ["rm", "-f", "/tmp/raw.bin", "/tmp/up.bin"])
    for name, cp_s, raw_s in (("down", down_s, raw_down_s), ("up", up_s, raw_up_s)):
        mibps, raw_mibps = args.file_mib / cp_s, args.file_mib / raw_s
        summary.add(
            f"cp {name} {args.file_mib} MiB (SDK)",
            round(mibps, 1),
            unit="MiB/s",
            baseline=round(raw_mibps, 1),
            baseline_name=f"cat through the raw channel ({name})",
            ratio=round(mibps / raw_mibps, 2),
            goal=">= 0.5x raw",
            met=mibps >= 0.5 * raw_mibps,
        )
    # -- concurrency -----------------------------------------------------------------------------
    per = max(1, args.concurrent // len(instances))
    outcome = await run_client("concurrent", base, token, str(per), *instances)
    summary.add(
        f"{per * len(instances)} concurrent execs across {len(instances)} instances",
        round(outcome["seconds"], 2),
        unit="s",
        goal="no error",
        met=not outcome["errors"],
    )
    if outcome["errors"]:
        summary.notes.append(f"concurrency errors: {outcome['errors'][:5]}")
    # -- the agent itself ------------------------------------------------------------------------
    summary.notes.append(f"agent binary: {DEFAULT_AGENT.stat().st_size / MIB:.2f} MiB")
    status = await agent_exec(
        hub,
        first,
        [
            "/bin/sh",
            "-c",
            # comm, not cmdline: this very shell's cmdline names the agent too.
            "for p in /proc/[0-9]*; do "
            '[ "$(cat $p/comm 2>/dev/null)" = vmfleet-agent ] && grep VmRSS $p/status; done',
        ],
    )
    rss = " ".join(status.decode().split())
    summary.notes.append(f"agent RSS in the guest (idle but for this exec): {rss}")


async def boot_without_agent(
    work: Path, image: str, summary: Summary, with_agent: list[float]
) -> None:
    """The same guest booted without the agent on its config disk, to its app's first line."""
    boot = await boot_assets(None, work / "assets-noagent")
    ctx = make_context(work / "host-noagent", boot)
    engine = HostEngine(ctx)
    cmd = create_command(image, cmd=["/bin/sh", "-c", "echo app-up; sleep 100000"])
    started = time.perf_counter()
    await engine.execute(cmd)
    app_log = engine.instance(cmd.instance_id).guest.app_log
    with anyio.fail_after(300):
        while not app_log.exists() or b"app-up" not in app_log.read_bytes():
            await anyio.sleep(0.02)
    seconds = time.perf_counter() - started
    await engine.execute(Delete(id="del-noagent", instance_id=cmd.instance_id, issued_at=utc_now()))
    summary.notes.append(
        f"boot to ready: {statistics.median(with_agent):.2f}s with the agent (agent answered), "
        f"{seconds:.2f}s without it (app's first line)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--file-mib", type=int, default=64)
    args = parser.parse_args()
    summary = Summary("agent", params=vars(args))
    work = Path(tempfile.mkdtemp(prefix="vba", dir="/tmp"))
    try:
        anyio.run(bench, args, work, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in summary.results:
        base = f"  (floor {row.baseline} {row.unit}: {row.baseline_name})" if row.baseline else ""
        met = "" if row.met is None else ("  goal met" if row.met else f"  GOAL MISSED: {row.goal}")
        print(f"{row.metric}: {row.result} {row.unit}{base}{met}")
    for note in summary.notes:
        print(f"note: {note}")
    summary.emit()


if __name__ == "__main__":
    main()
