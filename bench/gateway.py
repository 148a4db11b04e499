"""Gateway read latency and throughput, and the command round trip, next to their floors.

In one run, against a real nats-server and a `vmfleet gateway` process:
- GET /instances/{id} and GET /instances with 100 and with 10,000 instance records
  (written straight into the instances bucket: a read benchmark needs records, not VMs);
- floors: GET /health on the same server (constant JSON), and a bare nats-py KV get;
- the lifecycle command round trip HTTP -> command -> worker -> record -> HTTP, measured
  with a command the worker refuses by the state table (restore of a Running instance), so
  no hypervisor time is in it; floor: a core NATS request/reply.
Throughput is measured with ``wrk`` (Debian package ``wrk``; skipped with a message when it
is not installed), latency with one sequential client.
Goals ([5/6]): GET /instances/{id} p50 within 1.25x of GET /health and at least 0.8x its
throughput under wrk; command round trip under 5 ms p50 and 15 ms p99.
``--profile-dir DIR`` runs the gateway and the worker under cProfile (DIR/gateway.prof,
DIR/worker.prof) to see where the time goes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import Summary
from cli.embedded_nats import NatsServerProcess, free_port
from cli.token import mint_token
from natsbus import Layout, provision
from schemas.api import Hypervisor, InstanceState
from schemas.clock import utc_now
from schemas.codec import encode
from schemas.messages import InstanceRecord, Restore
from schemas.subjects import Subjects

VMFLEET = str(Path(sys.executable).parent / "vmfleet")
SECRET = "bench-secret-0123456789abcdef0123456789"
PREFIX = "bench"
ROOT = Path(__file__).resolve().parents[1]


#: Where --profile-dir puts the cProfile stats of the gateway and the worker (None: off).
PROFILE_DIR: Path | None = None


def vmfleet(role: str, *args: str) -> list[str]:
    """The command line of ``vmfleet ROLE``, under cProfile when profiling."""
    if PROFILE_DIR is None:
        return [VMFLEET, role, *args]
    profile = PROFILE_DIR / f"{role}.prof"
    return [sys.executable, "-m", "cProfile", "-o", str(profile), VMFLEET, role, *args]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(path)
        out.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return out


WRK = shutil.which("wrk")


def throughput(base_url: str, path: str, seconds: float) -> tuple[float, float] | None:
    """Requests per second and p50 latency (ms) of ``path`` under ``wrk`` (2 threads, 16
    connections): a C load generator, so the server saturates before the client does.
    None when wrk is not installed."""
    if WRK is None:
        return None
    out = subprocess.run(
        [
            WRK,
            "-t2",
            "-c16",
            f"-d{seconds:g}s",
            "--latency",
            "-H",
            f"Authorization: {auth()['Authorization']}",
            f"{base_url}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p50_ms = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    if "Non-2xx" in out:
        raise AssertionError(f"wrk saw errors on {path}:\n{out}")
    return rate, p50_ms


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET)}"}


def record(i: int) -> InstanceRecord:
    return InstanceRecord(
        id=f"b{i:023d}",
        name=f"bench-{i}",
        image="docker.io/library/busybox:latest",
        host="h",
        state=InstanceState.RUNNING,
        size_bytes=1 << 30,
        overlay_bytes=10 << 30,
        vcpus=2,
        hypervisor=Hypervisor.QEMU,
        created_at=utc_now(),
    )


async def fill(nats_url: str, n: int) -> None:
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().key_value(Subjects(PREFIX).instances_bucket)
    for i in range(n):
        await kv.put(record(i).id, encode(record(i)))
    await nc.close()


async def kv_floor(nats_url: str, n: int) -> list[float]:
    nc = await nats.connect(nats_url)
    kv = await nc.jetstream().key_value(Subjects(PREFIX).instances_bucket)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await kv.get(record(0).id)
        out.append(time.perf_counter() - start)
    await nc.close()
    return out


async def request_floor(nats_url: str, n: int) -> list[float]:
    nc = await nats.connect(nats_url)
    responder = await nats.connect(nats_url)

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"ok")

    await responder.subscribe("bench.echo", cb=echo)
    await responder.flush()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await nc.request("bench.echo", b"x", timeout=5)
        out.append(time.perf_counter() - start)
    await nc.close()
    await responder.close()
    return out


async def direct_round_trip(nats_url: str, instance_id: str, n: int) -> list[float]:
    """The refused restore published straight into the host's queue, its result awaited as
    the gateway does: what the worker and NATS take, without HTTP and the gateway."""
    subjects = Subjects(PREFIX)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    out = []
    for i in range(n):
        cmd = Restore(id=f"direct-{os.getpid()}-{i}", instance_id=instance_id, issued_at=utc_now())
        start = time.perf_counter()
        results = await nc.subscribe(subjects.result(cmd.id), max_msgs=1)
        await js.publish(
            subjects.command("benchhost", cmd.op), encode(cmd), headers={"Nats-Msg-Id": cmd.id}
        )
        await results.next_msg(timeout=10)
        out.append(time.perf_counter() - start)
        await results.unsubscribe()
    await nc.close()
    return out


def wait_for(check: object, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark setup did not converge")
        time.sleep(0.2)


def row(name: str, samples: list[float], floor: list[float] | None = None, goal: str = "") -> str:
    p50, p99 = pct(samples, 0.5) * 1000, pct(samples, 0.99) * 1000
    ratio = f"{p50 / (pct(floor, 0.5) * 1000):.2f}x" if floor else ""
    return f"| {name} | {p50:.2f} | {p99:.2f} | {ratio} | {goal} |"


def main(requests: int, with_worker: bool, as_json: bool = False) -> None:
    work = Path(tempfile.mkdtemp(prefix="vg", dir="/tmp"))
    server = NatsServerProcess(work / "nats")
    server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server.wait_ready()
        env = {
            **os.environ,
            "NATS_URL": server.url,
            "JWT_SECRET": SECRET,
            "VMFLEET_SUBJECT_PREFIX": PREFIX,
            "VMFLEET_LOG_LEVEL": "WARNING",
        }

        async def prepare() -> None:
            nc = await nats.connect(server.url)
            await provision(nc.jetstream(), Subjects(PREFIX), Layout())
            await nc.close()

        anyio.run(prepare)
        port = free_port()
        procs.append(
            subprocess.Popen(
                vmfleet("gateway", "--host", "127.0.0.1", "--port", str(port)), env=env
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ok(f"{base}/health"))
        lines = ["| measure | p50 ms | p99 ms | vs floor | goal |", "|---|---|---|---|---|"]
        summary = Summary("gateway", {"requests": requests})
        with httpx.Client(base_url=base, headers=auth()) as client:
            health = latencies(client, "/health", requests)
            kv = anyio.run(kv_floor_after_fill, server.url)
            lines.append(row("floor: GET /health (constant JSON)", health))
            lines.append(row("floor: nats-py KV get", kv))
            for n in (100, 10_000):
                anyio.run(fill, server.url, n)
                wait_for(lambda n=n: len(client.get("/instances").json()) == n)
                one = latencies(client, f"/instances/{record(n // 2).id}", requests)
                listing = latencies(
                    client, "/instances", max(20, requests // (10 if n > 100 else 1))
                )
                lines.append(
                    row(f"GET /instances/{{id}} ({n} instances)", one, health, "p50 <= 1.25x")
                )
                ratio = pct(one, 0.5) / pct(health, 0.5)
                summary.add(
                    f"GET /instances/{{id}} p50 ({n} records)",
                    round(pct(one, 0.5) * 1000, 2),
                    unit="ms",
                    baseline=round(pct(health, 0.5) * 1000, 2),
                    baseline_name="GET /health",
                    ratio=round(ratio, 2),
                    goal="p50 <= 1.25x GET /health",
                    met=ratio <= 1.25,
                    issue="5/6",
                )
                lines.append(row(f"GET /instances ({n} instances)", listing, health))
        rates = throughput(base, f"/instances/{record(1).id}", 5.0)
        health_rates = throughput(base, "/health", 5.0)
        if rates is None or health_rates is None:
            rate_line = "throughput: skipped, wrk is not installed (apt-get install wrk)"
        else:
            (rate, loaded_p50), (health_rate, health_loaded_p50) = rates, health_rates
            summary.add(
                "GET /instances/{id} per second (wrk, 16 connections)",
                round(rate),
                unit="/s",
                baseline=round(health_rate),
                baseline_name="GET /health per second",
                ratio=round(rate / health_rate, 2),
                goal=">= 0.8x GET /health",
                met=rate >= 0.8 * health_rate,
                issue="5/6",
            )
            rate_line = (
                f"GET /instances/{{id}}: {rate:.0f}/s, p50 {loaded_p50:.2f} ms under load; "
                f"GET /health: {health_rate:.0f}/s, p50 {health_loaded_p50:.2f} ms "
                f"({rate / health_rate:.2f}x; goal >= 0.8x; wrk -t2 -c16 on the same 2-core "
                "machine)"
            )
        if with_worker:
            lines += command_round_trip(server.url, base, env, procs, requests, summary)
        print("\n".join(lines))
        print(f"\n{rate_line}")
        if as_json:
            summary.emit()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


async def kv_floor_after_fill(nats_url: str) -> list[float]:
    await fill(nats_url, 1)
    return await kv_floor(nats_url, 500)


def command_round_trip(
    nats_url: str,
    base: str,
    env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    n: int,
    summary: Summary,
) -> list[str]:
    """One real VM; then a refused restore, again and again: pure control-plane time."""
    data = Path(tempfile.mkdtemp(prefix="vgw", dir="/tmp"))
    worker_env = {
        **env,
        "VMFLEET_HOST_ID": "benchhost",
        "VMFLEET_DATA_DIR": str(data),
        "VMFLEET_ASSETS_DIR": str(ROOT / ".cache" / "test-assets"),
    }
    procs.append(subprocess.Popen(vmfleet("worker"), env=worker_env))
    from tests.support.images import build_busybox_image, push_image
    from tests.support.registry import LocalRegistry

    registry = LocalRegistry(data.parent / f"{data.name}-registry")
    registry.start()
    try:
        image = push_image(
            build_busybox_image(data.parent / f"{data.name}-oci"), registry.address, "b:latest"
        )
        with httpx.Client(base_url=base, headers=auth(), timeout=120) as client:
            wait_for(lambda: any(h["id"] == "benchhost" for h in client.get("/hosts").json()))
            created = client.post(
                "/instances", json={"name": "rt", "image": image, "size": "256MB", "vcpus": 1}
            )
            assert created.status_code == 201, created.text
            iid = created.json()["id"]
            samples = []
            for _ in range(n // 5):
                start = time.perf_counter()
                refused = client.post(f"/instances/{iid}/restore")
                samples.append(time.perf_counter() - start)
                assert refused.status_code == 409, refused.text
            direct = anyio.run(direct_round_trip, nats_url, iid, n // 5)
            client.delete(f"/instances/{iid}")
        floor = anyio.run(request_floor, nats_url, 500)
        overhead = [s - statistics.median(floor) for s in samples]
        summary.add(
            "command round trip overhead p50",
            round(pct(overhead, 0.5) * 1000, 2),
            unit="ms",
            baseline=round(pct(floor, 0.5) * 1000, 2),
            baseline_name="NATS request/reply p50",
            ratio=round(pct(samples, 0.5) / pct(floor, 0.5), 2),
            goal="< 5 ms",
            met=pct(overhead, 0.5) * 1000 < 5,
            issue="4/9",
        )
        for q, goal_ms in ((0.5, 5), (0.99, 15)):
            summary.add(
                f"command round trip p{round(q * 100)} (refused restore)",
                round(pct(samples, q) * 1000, 2),
                unit="ms",
                baseline=round(pct(floor, q) * 1000, 2),
                baseline_name=f"NATS request/reply p{round(q * 100)}",
                ratio=round(pct(samples, q) / pct(floor, q), 2),
                goal=f"< {goal_ms} ms",
                met=pct(samples, q) * 1000 < goal_ms,
                issue="5/6",
            )
        return [
            row("floor: NATS request/reply", floor),
            row("command round trip (refused restore)", samples, None, "p50 < 5, p99 < 15"),
            row("  of it: worker + NATS (the command sent without the gateway)", direct),
            row("  minus the NATS floor", overhead, None, "p50 < 5 ms"),
        ]
    finally:
        registry.stop()
        for path in (data, data.parent / f"{data.name}-registry", data.parent / f"{data.name}-oci"):
            shutil.rmtree(path, ignore_errors=True)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--no-worker", action="store_true", help="skip the command round trip")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    parser.add_argument(
        "--profile-dir", type=Path, help="run gateway and worker under cProfile, stats in DIR"
    )
    args = parser.parse_args()
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR = args.profile_dir.resolve()
    main(args.requests, not args.no_worker, args.json)
