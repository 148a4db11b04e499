"""Fleet scale: instances created through one gateway onto many simulated hosts.

A benchmark instrument for the control plane only. The hosts are bench/simulated_host.py
(the worker's real command consumer, dispatcher, ledger, record publisher, queries and
heartbeats around a simulated engine: the state table and the capacity refusal, no VMs),
a few processes of them; NATS is a real nats-server with JetStream; the gateway is a real
`vmfleet gateway` process (its RSS is read from /proc). Creates go through its HTTP API
from concurrent httpx clients.

Measured, in one run:
- POST /instances: instances/s created, p50/p99 latency, errors by status and code;
- then checks: every 201 has exactly one record, no duplicated ids or names, as many
  records as 201s, no host over its capacity x overcommit (zero over-commit), the hosts'
  heartbeats agree with the records, the command stream is empty (nothing lost);
- an over-fill past the fleet's capacity (the gateway must refuse, never over-commit) and
  a command sent straight to a full host (the worker must refuse it as ``host_full``);
- GET /instances/{id} and GET /instances with every record, p50/p99;
- the gateway's memory (RSS) before, after the creates, after the lists, and its peak.
Baselines, same run, same concurrency: GET /health through the same gateway (the HTTP
floor), and a bare JetStream round trip per create (publish to a work queue, a pull
consumer does one KV put and replies; no vmfleet code), the floor of what one create
costs NATS.
Goals: ([6/9]) 10,000 instances placed with zero over-commit and zero lost or duplicated
records; ([5/6]) at least 400 creates/s through one gateway on this 2-core machine, with at
most 1 ms of gateway CPU per create.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
import anyio.abc
import h11
import httpx
import msgspec
import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.simulated_host import bare_stream
from bench.support import VMFLEET, Summary, cpu_seconds, pct, proc_status, stop_process, wait_for
from cli.embedded_nats import NatsServerProcess, free_port
from cli.token import mint_token
from gateway.commands import CommandSender
from natsbus import Layout, provision
from schemas.api import Hypervisor
from schemas.clock import utc_now
from schemas.codec import decode_host_record, decode_instance_record
from schemas.messages import Create, HostRecord, InstanceRecord
from schemas.subjects import Subjects

SECRET = "bench-fleet-secret-0123456789abcdef0123"
PREFIX = "fleet"
MIB = 1 << 20
SIZE_MIB = 256
OVERLAY_GIB = 1
VCPUS = 1
IMAGE = "docker.io/library/busybox:latest"
CPU_OVERCOMMIT = 4.0  # WorkerConfig's and GatewayConfig's default
GOAL_RATE = 400.0
#: Gateway CPU per create ([5/6]).
GOAL_GATEWAY_CPU_MS = 1.0


@dataclass
class Outcome:
    index: int
    status: int
    latency_s: float
    instance_id: str = ""
    name: str = ""
    code: str = ""
    message: str = ""


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET)}"}


# -- driving the API ---------------------------------------------------------------------------


async def drive_creates(
    base: str,
    bodies: list[dict[str, object]],
    concurrency: int,
    label: str,
    driver: str = "httpx",
) -> tuple[list[Outcome], float]:
    """POST every body with ``concurrency`` requests in flight, each from its own httpx
    client and connection (one pool shared by many tasks costs more than the gateway
    does); returns (outcomes, wall seconds)."""
    outcomes: list[Outcome] = []
    work = iter(enumerate(bodies))
    decode = msgspec.json.Decoder(dict[str, object]).decode
    step = max(1, len(bodies) // 10)

    async def post(client: httpx.AsyncClient | RawHttp, body: bytes) -> tuple[int, bytes]:
        if isinstance(client, RawHttp):
            return await client.request("POST", "/instances", body)
        response = await client.post(
            "/instances", content=body, headers={"Content-Type": "application/json"}
        )
        return response.status_code, response.content

    async def worker(client: httpx.AsyncClient | RawHttp) -> None:
        for i, body in work:
            start = time.perf_counter()
            try:
                status, content = await post(client, msgspec.json.encode(body))
            except (httpx.HTTPError, OSError, anyio.EndOfStream) as exc:
                outcomes.append(Outcome(i, 0, time.perf_counter() - start, code=type(exc).__name__))
                continue
            latency = time.perf_counter() - start
            try:
                payload = decode(content)
            except msgspec.DecodeError:
                payload = {}
            if status == 201:
                outcome = Outcome(
                    i, 201, latency, str(payload.get("id", "")), str(payload.get("name", ""))
                )
            else:
                outcome = Outcome(
                    i,
                    status,
                    latency,
                    code=str(payload.get("code", "")),
                    message=str(payload.get("message", content[:200].decode(errors="replace"))),
                )
            outcomes.append(outcome)
            if len(outcomes) % step == 0:
                print(f"  {label}: {len(outcomes)}/{len(bodies)}", file=sys.stderr, flush=True)

    async with clients(base, concurrency, driver) as pool:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for client in pool:
                tg.start_soon(worker, client)
        return outcomes, time.perf_counter() - start


@contextlib.asynccontextmanager
async def clients(
    base: str, n: int, driver: str = "httpx"
) -> AsyncIterator[list[httpx.AsyncClient | RawHttp]]:
    """``n`` clients of one connection each, connected before any timing starts (a new
    httpx client costs tens of milliseconds of CPU)."""
    async with contextlib.AsyncExitStack() as stack:
        pool: list[httpx.AsyncClient | RawHttp] = []
        for _ in range(n):
            if driver == "raw":
                raw = await RawHttp.connect(base)
                stack.push_async_callback(raw.aclose)
                pool.append(raw)
                continue
            http = httpx.AsyncClient(
                base_url=base, headers=auth(), timeout=120, limits=httpx.Limits(max_connections=1)
            )
            pool.append(await stack.enter_async_context(http))
        async with anyio.create_task_group() as tg:
            for client in pool:
                if isinstance(client, RawHttp):
                    tg.start_soon(client.request, "GET", "/health")
                else:
                    tg.start_soon(client.get, "/health")
        yield pool


class RawHttp:
    """One keep-alive HTTP/1.1 connection spoken through h11 (``--driver raw``): a load
    generator that costs a fraction of httpx's CPU, so more of this 2-CPU machine is left
    to what is measured. h11 does the protocol; this class only moves the bytes."""

    def __init__(self, stream: anyio.abc.ByteStream, host: str, token: str) -> None:
        self._stream = stream
        self._headers = [("Host", host), ("Authorization", f"Bearer {token}")]
        self._conn = h11.Connection(our_role=h11.CLIENT)

    @classmethod
    async def connect(cls, base: str) -> RawHttp:
        host, _, port = base.removeprefix("http://").partition(":")
        stream = await anyio.connect_tcp(host, int(port))
        return cls(stream, f"{host}:{port}", mint_token(SECRET))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        headers = list(self._headers)
        if body:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        out = self._conn.send(h11.Request(method=method, target=path, headers=headers))
        if body:
            out += self._conn.send(h11.Data(data=body))
        await self._stream.send(out + self._conn.send(h11.EndOfMessage()))
        status, payload = 0, bytearray()
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(await self._stream.receive())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._conn.start_next_cycle()
                return status, bytes(payload)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def drive_gets(
    base: str, path: str, n: int, concurrency: int, driver: str = "httpx"
) -> tuple[list[float], float]:
    samples: list[float] = []
    remaining = iter(range(n))

    async def worker(client: httpx.AsyncClient | RawHttp) -> None:
        for _ in remaining:
            start = time.perf_counter()
            if isinstance(client, RawHttp):
                status, _ = await client.request("GET", path)
            else:
                status = (await client.get(path)).status_code
            samples.append(time.perf_counter() - start)
            assert status == 200, status

    async with clients(base, concurrency, driver) as pool:
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for client in pool:
                tg.start_soon(worker, client)
        return samples, time.perf_counter() - start


def latencies(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(path)
        out.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return out


# -- the bare baseline ---------------------------------------------------------------------------


async def bare_round_trips(
    nats_url: str, hosts: list[str], n: int, concurrency: int
) -> tuple[list[float], float]:
    """Publish to the bare work queue, await the consumer's reply: the NATS floor."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    payload = msgspec.json.encode(
        {"op": "create", "name": "bare", "image": IMAGE, "size_bytes": SIZE_MIB * MIB}
    )
    samples: list[float] = []
    work = iter(range(n))

    async def worker() -> None:
        for i in work:
            key = uuid.uuid4().hex
            start = time.perf_counter()
            sub = await nc.subscribe(f"{PREFIX}bare.result.{key}", max_msgs=1)
            await js.publish(
                f"{PREFIX}bare.cmd.{hosts[i % len(hosts)]}",
                payload,
                headers={"Nats-Msg-Id": key},
            )
            await sub.next_msg(timeout=60)
            samples.append(time.perf_counter() - start)
            await sub.unsubscribe()

    start = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return samples, time.perf_counter() - start
    finally:
        await nc.close()


# -- checks --------------------------------------------------------------------------------------


async def read_bucket(nats_url: str, bucket: str) -> dict[str, bytes]:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        watcher = await kv.watchall()
        out: dict[str, bytes] = {}
        while True:
            entry = await watcher.updates(timeout=30)  # type: ignore[no-untyped-call]
            if entry is None:
                break
            if entry.operation in ("DEL", "PURGE"):
                out.pop(entry.key, None)
            else:
                out[entry.key] = entry.value or b""
        await watcher.stop()  # type: ignore[no-untyped-call]
        return out
    finally:
        await nc.close()


async def commands_left(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(Subjects(PREFIX).commands_stream)
        return int(info.state.messages)
    finally:
        await nc.close()


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_fleet(
    nats_url: str,
    created: list[Outcome],
    capacity: tuple[int, int],
    hosts: list[str],
    heartbeat_s: float,
) -> tuple[list[Check], dict[str, InstanceRecord]]:
    """Records against the 201s, the hosts' capacity and their heartbeats."""
    subjects = Subjects(PREFIX)
    raw = anyio.run(read_bucket, nats_url, subjects.instances_bucket)
    records = {key: decode_instance_record(value) for key, value in raw.items()}
    ids = [o.instance_id for o in created]
    names = [r.name for r in records.values()]
    checks = [
        Check(
            "every 201 has exactly one record",
            all(i in records for i in ids),
            f"{sum(i not in records for i in ids)} of {len(ids)} created instances have no record",
        ),
        Check(
            "no id answered twice",
            len(set(ids)) == len(ids),
            f"{len(ids) - len(set(ids))} ids returned by more than one 201",
        ),
        Check(
            "records == successful creates",
            len(records) == len(set(ids)),
            f"{len(records)} records, {len(set(ids))} created",
        ),
        Check(
            "no duplicated names",
            len(set(names)) == len(names),
            f"{len(names) - len(set(names))} names used twice",
        ),
        Check(
            "every record Running",
            all(r.state.value == "Running" for r in records.values()),
            str(Counter(r.state.value for r in records.values())),
        ),
    ]
    vcpu_limit = capacity[0] * CPU_OVERCOMMIT
    memory_limit = capacity[1]
    per_host: dict[str, list[InstanceRecord]] = defaultdict(list)
    for record in records.values():
        per_host[record.host].append(record)
    over = []
    for host, held in per_host.items():
        vcpus = sum(r.vcpus for r in held)
        memory = sum(r.size_bytes + r.hotplug_bytes for r in held)
        if vcpus > vcpu_limit or memory > memory_limit or host not in hosts:
            over.append(f"{host}: {vcpus} vCPUs, {memory >> 20} MiB")
    checks.append(
        Check("zero over-commit", not over, "; ".join(over[:5]) or f"{len(per_host)} hosts used")
    )
    # A heartbeat written after the last command shows each host's own table.
    time.sleep(heartbeat_s + 1)
    beats = {
        k: decode_host_record(v)
        for k, v in anyio.run(read_bucket, nats_url, subjects.hosts_bucket).items()
    }
    disagree = [
        h
        for h in hosts
        if (beat := beats.get(h)) is None
        or beat.instances != len(per_host.get(h, []))
        or beat.memory_allocated_bytes != sum(r.size_bytes for r in per_host.get(h, []))
    ]
    checks.append(
        Check(
            "heartbeats agree with records",
            not disagree,
            f"{len(disagree)} hosts disagree: {disagree[:5]}; "
            + _beat_vs_records(disagree[0], beats, per_host)
            if disagree
            else "all hosts",
        )
    )
    left = anyio.run(commands_left, nats_url)
    checks.append(Check("command stream drained", left == 0, f"{left} commands left"))
    return checks, records


def _beat_vs_records(
    host: str, beats: dict[str, HostRecord], per_host: dict[str, list[InstanceRecord]]
) -> str:
    """What one disagreeing host's heartbeat says next to what its records hold."""
    held = per_host.get(host, [])
    beat = beats.get(host)
    said = (
        f"{beat.instances} instances, {beat.memory_allocated_bytes >> 20} MiB"
        if beat is not None
        else "no heartbeat"
    )
    memory = sum(r.size_bytes for r in held) >> 20
    return f"{host}'s heartbeat: {said}; its records: {len(held)}, {memory} MiB"


async def probe_full_host(
    nats_url: str, host: str, held_bytes: int, memory_limit: int
) -> tuple[bool, str]:
    """A Create straight to a host, just over its free memory: it must say host_full."""
    nc = await nats.connect(nats_url)
    try:
        free = memory_limit - held_bytes
        size = max(64 * MIB, free + MIB)
        iid = uuid.uuid4().hex[:24]
        cmd = Create(
            id=f"probe-{iid}",
            instance_id=iid,
            issued_at=utc_now(),
            name=f"probe-{iid}",
            image=IMAGE,
            size_bytes=size,
            overlay_bytes=64 * MIB,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
        )
        result = await CommandSender(nc, Subjects(PREFIX)).send(host, cmd, timeout_s=30)
        code = result.error.code if result.error else "ok"
        return (
            not result.ok and code == "host_full"
        ), f"{size >> 20} MiB asked, {free >> 20} free: {code}"
    finally:
        await nc.close()


# -- setup -----------------------------------------------------------------------------------


async def prepare(nats_url: str) -> None:
    from nats.js.api import KeyValueConfig

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await provision(js, Subjects(PREFIX), Layout())
    await js.add_stream(bare_stream(PREFIX))
    await js.create_key_value(KeyValueConfig(bucket=f"{PREFIX}_bare", history=1))
    await nc.close()


def start_hosts(
    nats_url: str,
    work: Path,
    ledgers: Path,
    hosts: list[str],
    procs: int,
    capacity: tuple[int, int],
    args: argparse.Namespace,
) -> list[subprocess.Popen[str]]:
    script = str(Path(__file__).with_name("simulated_host.py"))
    groups = [hosts[i::procs] for i in range(procs)]
    started: list[subprocess.Popen[str]] = []
    for group in filter(None, groups):
        started.append(
            subprocess.Popen(
                [
                    sys.executable,
                    script,
                    "--nats",
                    nats_url,
                    "--prefix",
                    PREFIX,
                    "--data",
                    str(ledgers),
                    "--hosts",
                    ",".join(group),
                    "--vcpus",
                    str(capacity[0]),
                    "--memory-mib",
                    str(capacity[1] // MIB),
                    # Disk is not what binds here: twice what the overlays need.
                    "--disk-gib",
                    str(2 * OVERLAY_GIB * capacity[1] // (SIZE_MIB * MIB)),
                    "--heartbeat-s",
                    str(args.heartbeat_s),
                    "--op-delay-ms",
                    str(args.op_delay_ms),
                    "--bare",
                ],
                stdout=subprocess.PIPE,
                stderr=(work / f"hosts-{len(started)}.log").open("w"),
                text=True,
            )
        )
    for proc in started:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"simulated hosts did not start (exit {proc.poll()})")
    return started


def phase(name: str) -> None:
    print(f"{datetime.now():%H:%M:%S,%f}"[:-3] + f" phase: {name}", file=sys.stderr, flush=True)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


class Sampler:
    """Peak RSS of a process, sampled in a thread while a phase runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, proc_status(self.pid).get("VmRSS", 0))


def _error_samples(outcomes: list[Outcome]) -> list[str]:
    """One message for each kind of error seen."""
    seen: dict[str, str] = {}
    for o in outcomes:
        if o.status != 201:
            seen.setdefault(f"{o.status} {o.code}", o.message)
    if not seen:
        return []
    return ["errors seen (one message of each kind):"] + [f"  {k}: {v}" for k, v in seen.items()]


def _log_summary(work: Path) -> list[str]:
    """Warnings and errors the gateway and the hosts logged during the run, counted, with
    the times of the first and the last (to set against the phase times above)."""
    seen: Counter[str] = Counter()
    when: dict[str, tuple[str, str]] = {}
    for path in sorted(work.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line:
                _, clock, text = line.split(" ", 2)
                key = f"{path.stem}: {text[:90]}"
                seen[key] += 1
                when[key] = (when.get(key, (clock, ""))[0], clock)
    if not seen:
        return ["logged warnings/errors: none"]
    return ["logged warnings/errors (count, first - last):"] + [
        f"  {n} x {k} ({when[k][0]} - {when[k][1]})" for k, n in seen.most_common(8)
    ]


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


# -- the run -----------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    summary = Summary(
        "fleet",
        {
            "hosts": args.hosts,
            "instances": args.instances,
            "concurrency": args.concurrency,
            "host_procs": args.host_procs,
            "driver": args.driver,
            "headroom": args.headroom,
        },
    )
    hosts = [f"sim-{i:03d}" for i in range(args.hosts)]
    slots = math.ceil(args.instances * (1 + args.headroom) / args.hosts)
    capacity = (math.ceil(slots * VCPUS / CPU_OVERCOMMIT), slots * SIZE_MIB * MIB)
    work = Path(tempfile.mkdtemp(prefix="vfleet", dir="/tmp"))
    server = NatsServerProcess(work / "nats")
    procs: list[subprocess.Popen[str]] = []
    gateway: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    cleanup = [work]
    server.start()
    try:
        server.wait_ready()
        anyio.run(prepare, server.url)
        env = {
            **os.environ,
            "NATS_URL": server.url,
            "JWT_SECRET": SECRET,
            "VMFLEET_SUBJECT_PREFIX": PREFIX,
            "VMFLEET_LOG_LEVEL": "WARNING",
        }
        port = free_port()
        profile = (
            [sys.executable, "-m", "cProfile", "-o", args.profile_gateway]
            if args.profile_gateway
            else []
        )
        gateway = subprocess.Popen(
            [*profile, VMFLEET, "gateway", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stderr=(work / "gateway.log").open("w"),
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ok(f"{base}/health"), what="gateway start")
        # The hosts' ledgers (one fsynced file per command): on tmpfs unless asked otherwise.
        # 50 hosts on one disk and, 25 to an event loop, would wait on each other's fsyncs,
        # which 50 real hosts, each with its own disk and loop, do not.
        shm = Path("/dev/shm")
        ledgers = (
            Path(tempfile.mkdtemp(prefix="vfleet", dir=shm))
            if shm.is_dir() and not args.ledgers_on_disk
            else work / "hosts"
        )
        cleanup.append(ledgers)
        procs = start_hosts(server.url, work, ledgers, hosts, args.host_procs, capacity, args)
        with httpx.Client(base_url=base, headers=auth(), timeout=120) as client:
            wait_for(lambda: len(client.get("/hosts").json()) == len(hosts), what="host start")
        rss_idle = proc_status(gateway.pid).get("VmRSS", 0)
        print(
            f"{len(hosts)} simulated hosts ({len(procs)} processes), each {capacity[0]} CPUs "
            f"(x{CPU_OVERCOMMIT:g}) and {capacity[1] >> 20} MiB = {slots} instances of "
            f"{VCPUS} vCPU / {SIZE_MIB} MiB; {args.instances} creates, {args.concurrency} "
            "in flight",
            file=sys.stderr,
        )

        # Baselines first, on the empty fleet.
        phase("baselines")
        health, health_wall = anyio.run(
            drive_gets, base, "/health", args.baseline_ops, args.concurrency, args.driver
        )
        bare, bare_wall = anyio.run(
            bare_round_trips, server.url, hosts, args.baseline_ops, args.concurrency
        )
        health_rate = len(health) / health_wall
        bare_rate = len(bare) / bare_wall

        # The creates.
        bodies: list[dict[str, object]] = [
            {
                "name": f"fleet-{i:05d}",
                "image": IMAGE,
                "size": f"{SIZE_MIB}MB",
                "overlay_size": f"{OVERLAY_GIB}GB",
                "vcpus": VCPUS,
                "network": {"enabled": False},
            }
            for i in range(args.instances)
        ]
        cpu_before = {
            "driver": time.process_time(),
            "gateway": cpu_seconds(gateway.pid),
            "hosts": sum(cpu_seconds(p.pid) for p in procs),
            "nats": cpu_seconds(server.pid or 0),
        }
        phase("creates")
        with Sampler(gateway.pid) as sampler:
            outcomes, wall = anyio.run(
                drive_creates, base, bodies, args.concurrency, "creates", args.driver
            )
        cpu_used = {
            "driver": time.process_time() - cpu_before["driver"],
            "gateway": cpu_seconds(gateway.pid) - cpu_before["gateway"],
            "hosts": sum(cpu_seconds(p.pid) for p in procs) - cpu_before["hosts"],
            "nats": cpu_seconds(server.pid or 0) - cpu_before["nats"],
        }
        rss_created = proc_status(gateway.pid).get("VmRSS", 0)
        created = [o for o in outcomes if o.status == 201]
        failed = Counter(f"{o.status} {o.code}" for o in outcomes if o.status != 201)
        create_lat = [o.latency_s for o in created]
        rate = len(created) / wall
        phase("checks")
        checks, records = check_fleet(server.url, created, capacity, hosts, args.heartbeat_s)

        # Past capacity: the gateway must refuse, nothing may over-commit.
        fill_outcomes: list[Outcome] = []
        fill_created: list[Outcome] = []
        fill_refused = Counter[str]()
        probe_ok, probe_detail = True, "skipped"
        if not args.no_overfill:
            room = len(hosts) * slots - len(records)
            extra = room + max(20, room // 10)
            fill_bodies: list[dict[str, object]] = [
                {**bodies[0], "name": f"fill-{i:05d}"} for i in range(extra)
            ]
            fill, _ = anyio.run(
                drive_creates, base, fill_bodies, args.concurrency, "over-fill", args.driver
            )
            fill_outcomes = fill
            fill_created = [o for o in fill if o.status == 201]
            fill_refused = Counter(f"{o.status} {o.code}" for o in fill if o.status != 201)
            checks2, records = check_fleet(
                server.url, created + fill_created, capacity, hosts, args.heartbeat_s
            )
            checks += [Check(f"after over-fill: {c.name}", c.ok, c.detail) for c in checks2]
            checks.append(
                Check(
                    "over-fill: refused past capacity only",
                    len(fill_created) <= room and sum(fill_refused.values()) >= extra - room,
                    f"room {room}: {len(fill_created)} created, refused {dict(fill_refused)}",
                )
            )
            held: dict[str, int] = defaultdict(int)
            for record in records.values():
                held[record.host] += record.size_bytes + record.hotplug_bytes
            fullest = max(hosts, key=lambda h: (held[h], h))
            probe_ok, probe_detail = anyio.run(
                probe_full_host, server.url, fullest, held[fullest], capacity[1]
            )
            checks.append(Check("worker refuses past capacity (host_full)", probe_ok, probe_detail))

        # Reads with every record in the gateway's view.
        phase("reads")
        some_id = created[len(created) // 2].instance_id if created else ""
        with httpx.Client(base_url=base, headers=auth(), timeout=120) as client:
            wait_for(
                lambda: len(client.get("/instances").json()) == len(records), what="view catch-up"
            )
            health_seq = latencies(client, "/health", args.reads)
            get_seq = latencies(client, f"/instances/{some_id}", args.reads)
            list_seq = latencies(client, "/instances", max(10, args.reads // 25))
        get_par, get_wall = anyio.run(
            drive_gets,
            base,
            f"/instances/{some_id}",
            args.baseline_ops,
            args.concurrency,
            args.driver,
        )
        rss_after = proc_status(gateway.pid)
        rss_peak = max(sampler.peak, rss_after.get("VmHWM", 0))

        # -- report ----------------------------------------------------------------------------
        ms = 1000.0
        n_records = len(records)
        all_ok = all(c.ok for c in checks)
        gateway_cpu_ms = cpu_used["gateway"] * ms / max(1, len(created))
        lines += [
            f"fleet: {len(hosts)} simulated hosts, {args.instances} creates through one "
            f"gateway, {args.concurrency} in flight from {args.driver} clients (simulated "
            "hosts: control plane only)",
            "",
            "| measure | result | baseline (same run) | ratio | goal |",
            "|---|---|---|---|---|",
            f"| creates/s | {rate:.0f} | bare JetStream round trip {bare_rate:.0f}/s; "
            f"GET /health {health_rate:.0f}/s | {rate / bare_rate:.2f}x bare; "
            f"{rate / health_rate:.2f}x /health | >= {GOAL_RATE:.0f}/s |",
            f"| create p50 / p99 ms | {pct(create_lat, 0.5) * ms:.1f} / "
            f"{pct(create_lat, 0.99) * ms:.1f} | bare {pct(bare, 0.5) * ms:.1f} / "
            f"{pct(bare, 0.99) * ms:.1f}; /health {pct(health, 0.5) * ms:.1f} / "
            f"{pct(health, 0.99) * ms:.1f} | "
            f"{pct(create_lat, 0.5) / pct(bare, 0.5):.2f}x bare p50 | |",
            f"| instances placed | {len(created)} of {args.instances} "
            f"({dict(failed) or 'no errors'}) | | | {args.instances}, zero over-commit, "
            "zero lost or duplicated |",
            f"| GET /instances/{{id}} p50 / p99 ms ({n_records} records) | "
            f"{pct(get_seq, 0.5) * ms:.2f} / {pct(get_seq, 0.99) * ms:.2f} | GET /health "
            f"{pct(health_seq, 0.5) * ms:.2f} / {pct(health_seq, 0.99) * ms:.2f} | "
            f"{pct(get_seq, 0.5) / pct(health_seq, 0.5):.2f}x | |",
            f"| GET /instances/{{id}}/s, {args.concurrency} in flight | "
            f"{len(get_par) / get_wall:.0f} | GET /health {health_rate:.0f}/s | "
            f"{len(get_par) / get_wall / health_rate:.2f}x | |",
            f"| GET /instances p50 / p99 ms ({n_records} records) | "
            f"{pct(list_seq, 0.5) * ms:.1f} / {pct(list_seq, 0.99) * ms:.1f} | | | |",
            f"| gateway RSS: idle / after creates / after reads / peak | {mib(rss_idle)} / "
            f"{mib(rss_created)} / {mib(rss_after.get('VmRSS', 0))} / {mib(rss_peak)} | | | |",
            f"| gateway RSS per record | "
            f"{(rss_after.get('VmRSS', 0) - rss_idle) / max(1, n_records) / 1024:.1f} KiB | | | |",
            f"| CPU s during creates: gateway / hosts / nats-server / this driver | "
            f"{cpu_used['gateway']:.1f} / {cpu_used['hosts']:.1f} / {cpu_used['nats']:.1f} / "
            f"{cpu_used['driver']:.1f} "
            f"(wall {wall:.1f} s, {os.cpu_count()} CPUs) | | | |",
            f"| gateway CPU per create | {gateway_cpu_ms:.2f} ms | | | "
            f"<= {GOAL_GATEWAY_CPU_MS:g} ms |",
            "",
            "checks:",
            *[f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks],
            *_error_samples(outcomes + fill_outcomes),
            *_log_summary(work),
        ]
        print("\n".join(lines))
        placed_all = len(created) == args.instances
        summary.add(
            "creates/s through one gateway",
            round(rate, 1),
            unit="/s",
            baseline=round(bare_rate, 1),
            baseline_name="bare JetStream publish + KV put round trip",
            ratio=round(rate / bare_rate, 3),
            goal=f">= {GOAL_RATE:.0f}/s",
            met=rate >= GOAL_RATE,
            issue="5/6",
        )
        summary.add(
            "gateway CPU per create",
            round(gateway_cpu_ms, 2),
            unit="ms",
            goal=f"<= {GOAL_GATEWAY_CPU_MS:g} ms",
            met=gateway_cpu_ms <= GOAL_GATEWAY_CPU_MS,
            issue="5/6",
        )
        summary.add(
            "create p50 / p99",
            f"{pct(create_lat, 0.5) * ms:.1f} / {pct(create_lat, 0.99) * ms:.1f} ms",
            baseline=f"{pct(bare, 0.5) * ms:.1f} / {pct(bare, 0.99) * ms:.1f} ms",
            baseline_name="bare round trip",
            ratio=round(pct(create_lat, 0.5) / pct(bare, 0.5), 2),
            issue="6/9",
        )
        summary.add(
            f"instances placed ({args.hosts} hosts)",
            f"{len(created)} of {args.instances}",
            goal=f"{args.instances}, zero over-commit, zero lost/duplicated",
            met=placed_all and all_ok,
            issue="6/9",
        )
        summary.add(
            f"GET /instances/{{id}} p50 ({n_records} records)",
            f"{pct(get_seq, 0.5) * ms:.2f} ms",
            baseline=f"{pct(health_seq, 0.5) * ms:.2f} ms",
            baseline_name="GET /health",
            ratio=round(pct(get_seq, 0.5) / pct(health_seq, 0.5), 2),
            issue="6/9",
        )
        summary.add(
            f"GET /instances p50 / p99 ({n_records} records)",
            f"{pct(list_seq, 0.5) * ms:.1f} / {pct(list_seq, 0.99) * ms:.1f} ms",
            issue="6/9",
        )
        summary.add(
            "gateway RSS after creates / peak",
            f"{mib(rss_after.get('VmRSS', 0))} / {mib(rss_peak)}",
            baseline=mib(rss_idle),
            baseline_name="idle gateway",
            issue="6/9",
        )
        summary.notes = [f"{'ok' if c.ok else 'FAIL'}: {c.name}: {c.detail}" for c in checks]
        if args.json:
            summary.emit()
        if not (all_ok and placed_all):
            sys.exit(1)
    finally:
        for proc in procs:
            stop_process(proc, 30)
        if gateway is not None:
            stop_process(gateway, 30)
        server.stop()
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32, help="creates in flight")
    parser.add_argument(
        "--driver",
        choices=["httpx", "raw"],
        default="raw",
        help="HTTP client of the load: one h11 connection per worker (default: ~0.2 ms of "
        "CPU a request) or httpx (~3 ms a request here, more than the gateway spends)",
    )
    parser.add_argument("--host-procs", type=int, default=2, help="processes for the hosts")
    parser.add_argument(
        "--headroom", type=float, default=0.1, help="fleet capacity beyond --instances (0.1: 10%%)"
    )
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--op-delay-ms", type=float, default=0.0, help="simulated VMM time")
    parser.add_argument("--baseline-ops", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--no-overfill", action="store_true")
    parser.add_argument(
        "--profile-gateway", metavar="PATH", help="run the gateway under cProfile, stats to PATH"
    )
    parser.add_argument(
        "--ledgers-on-disk", action="store_true", help="keep the hosts' ledgers off /dev/shm"
    )
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    main(parser.parse_args())
