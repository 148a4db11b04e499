"""Wake on connection: a sleeping instance's first HTTP byte, next to an API restore and a
raw QEMU restore of the same snapshot, in one run.

A `vmfleet dev` stack (gateway, worker, NATS) runs one 256 MiB guest: busybox httpd on
guest port 8080 behind a mapped host port, an auto_standby policy enabled (so a Standby
holds its port). Each round:

- **wake**: ``POST /standby``, then a plain HTTP GET on the mapped port: connect → the first
  byte of the answer (the restore, the relay, the guest's answer);
- **API restore**: ``POST /standby``, then ``POST /restore``: request → response (the
  instance Running); then a GET, so the next round starts awake;
- **raw restore**: the snapshot of the last standby copied aside, then a
  ``qemu-system-x86_64`` with the instance's own command line (its forward on another
  port) and ``-incoming defer``: spawn → ``migrate-incoming`` → ``cont`` (no vmfleet code),
  and the same GET through its forward: spawn → first byte.

Then the throughput of a Running instance after a wake: a 64 MiB download through the
mapped port (handed back to QEMU with ``hostfwd_add``) next to the same download through
the forward on the same QEMU's command line (QEMU's own path), alternated; a raw QEMU of
the same snapshot is measured too, as a note. The restore's steps and the wakes' split
(VM running, guest accepting) come from the instance's ops log.

Goals (issue #16): wake <= 1.3x the API restore; vmfleet's overhead over the raw restore
(wake's first byte - raw spawn → first byte) < 100 ms p50; throughput >= 0.9x QEMU's own.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import RawQmp, Summary, dev_stack, pct, wait_for
from cli.embedded_nats import free_port
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry
from worker.drivers.base import PortForward, VmSpec
from worker.drivers.qemu import build_args, qemu_binary

GUEST_PORT = 8080
BIG_MIB = 64
SERVE = (
    "mkdir -p /www && echo awake > /www/index.html && "
    f"dd if=/dev/zero of=/www/big bs=1M count={BIG_MIB} 2>/dev/null; "
    f"exec httpd -f -p {GUEST_PORT} -h /www"
)


def first_byte(port: int, path: str = "/") -> tuple[float, bytes]:
    """Connect, GET, read to the end: (seconds from connect to the first byte, body)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        chunks = [sock.recv(65536)]
        elapsed = time.perf_counter() - start
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return elapsed, b"".join(chunks).partition(b"\r\n\r\n")[2]


def throughput(port: int, rounds: int = 3) -> float:
    """MiB/s of the best of ``rounds`` downloads of /big."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        _, body = first_byte(port, "/big")
        assert len(body) == BIG_MIB << 20, len(body)
        best = max(best, BIG_MIB / (time.perf_counter() - start))
    return best


def raw_restore(
    spec: VmSpec, memory: Path, work: Path
) -> tuple[float, float, int, subprocess.Popen[bytes]]:
    """The instance's command line, its forward on a port of its own: (spawn → cont,
    spawn → first byte of a GET, the port, the process, left running)."""
    port = free_port()
    nics = tuple(
        msgspec.structs.replace(
            nic,
            forwards=tuple(
                PortForward(
                    protocol="tcp", host_addr="127.0.0.1", host_port=port, guest_port=f.guest_port
                )
                for f in nic.forwards
            ),
        )
        for nic in spec.nics
    )
    run = work / "raw-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    raw = msgspec.structs.replace(
        spec, nics=nics, run_dir=str(run), serial_log=str(run / "console.log")
    )
    argv = build_args(raw, binary=qemu_binary(), incoming=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp = RawQmp(run / "qmp.sock")
        qmp.cmd("migrate-incoming", uri=f"exec:cat {memory}")
        while _status(qmp) not in ("paused", "running"):
            time.sleep(0.001)
        qmp.cmd("cont")
        restored = time.perf_counter() - start
        qmp.close()
        connect_at = time.perf_counter() - start
        elapsed, body = first_byte(port)
        assert body.strip() == b"awake", body
    except BaseException:
        stop_raw(proc)  # never left running
        raise
    return restored, connect_at + elapsed, port, proc


def copy_snapshot(data: Path, iid: str, memory: Path) -> VmSpec:
    """The instance's last snapshot: its memory copied to ``memory``, its device model."""
    snapshot = data / "guests" / iid / "snapshots" / "snapshot-latest"
    shutil.copyfile(snapshot / "memory", memory)
    return msgspec.json.decode((snapshot / "vm.json").read_bytes(), type=VmSpec)


def port_holder(port: int) -> str:
    """Which process listens on ``port`` (qemu once the port is handed back)."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    return out.split("users:", 1)[-1].strip() or "nobody"


def command_line_forward(holder: str) -> int:
    """The host port of the forward on the QEMU command line of the process ``holder``
    names (``(("qemu-system-x86",pid=N,fd=M))``)."""
    pid = int(holder.split("pid=", 1)[1].split(",", 1)[0])
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    netdev = next(arg.decode() for arg in argv if b"hostfwd=" in arg)
    return int(netdev.split("hostfwd=tcp:", 1)[1].split(":", 1)[1].split("-", 1)[0])


def ops_log(data: Path, iid: str) -> list[str]:
    return (data / "guests" / iid / "logs" / "ops.log").read_text().splitlines()


def _status(qmp: RawQmp) -> object:
    answer = qmp.cmd("query-status").get("return")
    return answer.get("status") if isinstance(answer, dict) else None


def stop_raw(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = Summary("wake", params={"rounds": args.rounds, "memory": "256MB"})
    with tempfile.TemporaryDirectory(prefix="bench-wake-") as tmp:
        work = Path(tmp)
        registry = LocalRegistry(work / "registry")
        registry.start()
        try:
            image = push_image(build_busybox_image(work / "oci"), registry.address, "wake:latest")
            with dev_stack(work / "data", free_port(), banner_timeout_s=180) as stack:
                measure(
                    stack.base_url, stack.headers, work / "data", image, work, args.rounds, summary
                )
        finally:
            registry.stop()
    if args.json:
        summary.emit()


def measure(
    base_url: str,
    headers: dict[str, str],
    data: Path,
    image: str,
    work: Path,
    rounds: int,
    summary: Summary,
) -> None:
    api = httpx.Client(base_url=base_url, headers=headers, timeout=300)
    port = free_port()
    created = api.post(
        "/instances",
        json={
            "name": "wake-bench",
            "image": image,
            "size": "256MB",
            "vcpus": 1,
            "cmd": ["sh", "-c", SERVE],
            "auto_standby": {"enabled": True, "idle_timeout": "1h"},
            "port_mappings": [{"guest_port": GUEST_PORT, "host_port": port}],
        },
    )
    created.raise_for_status()
    iid = created.json()["id"]

    def served() -> bool:
        try:
            return first_byte(port)[1].strip() == b"awake"
        except OSError:
            return False

    wait_for(served, timeout_s=300, what="the guest's httpd")
    first_byte(port, "/big")  # the file is there
    wakes, restores, raws, raw_fb = [], [], [], []
    memory = work / "memory"
    for _ in range(rounds):
        api.post(f"/instances/{iid}/standby").raise_for_status()
        elapsed, body = first_byte(port)
        assert body.strip() == b"awake", body
        wakes.append(elapsed)
        api.post(f"/instances/{iid}/standby").raise_for_status()
        # The raw baseline, while the instance sleeps: the VMMs would fight over the disks'
        # locks (its httpd only reads them).
        spec = copy_snapshot(data, iid, memory)
        restored, fb, _, proc = raw_restore(spec, memory, work)
        stop_raw(proc)
        raws.append(restored)
        raw_fb.append(fb)
        start = time.perf_counter()
        api.post(f"/instances/{iid}/restore").raise_for_status()
        restores.append(time.perf_counter() - start)
        assert first_byte(port)[1].strip() == b"awake"
    # Steady state after a wake, on the same QEMU: the mapped port (handed back with
    # hostfwd_add) against the forward its command line has (the wake's internal one),
    # alternated so that the machine's load hits both alike.
    api.post(f"/instances/{iid}/standby").raise_for_status()
    first_byte(port)
    holder = port_holder(port)
    print(f"after the wake, port {port} is held by {holder}")
    summary.notes.append(f"after the wake the mapped port is held by {holder}")
    own = command_line_forward(holder)
    mapped = direct = 0.0
    for _ in range(3):
        mapped = max(mapped, throughput(port, rounds=1))
        direct = max(direct, throughput(own, rounds=1))
    api.post(f"/instances/{iid}/standby").raise_for_status()
    _, _, raw_port, proc = raw_restore(copy_snapshot(data, iid, memory), memory, work)
    try:
        raw_mib = throughput(raw_port)
    finally:
        stop_raw(proc)
    summary.notes.append(f"a raw QEMU restored from the same snapshot: {raw_mib:.0f} MiB/s")
    print(f"raw QEMU of the same snapshot: {raw_mib:.0f} MiB/s")
    steps = [line for line in ops_log(data, iid) if "restore steps" in line or "woken by" in line]
    summary.notes += [line.split(" INFO ", 1)[-1] for line in steps]
    print("\n".join(steps))
    api.delete(f"/instances/{iid}")
    report(summary, wakes, restores, raws, raw_fb, mapped, direct)


def report(
    summary: Summary,
    wakes: list[float],
    restores: list[float],
    raws: list[float],
    raw_fb: list[float],
    mapped: float,
    direct: float,
) -> None:
    def ms(xs: list[float], q: float = 0.5) -> float:
        return round(pct(xs, q) * 1000, 1)

    wake, api_restore, raw_first = ms(wakes), ms(restores), ms(raw_fb)
    # p50 against p50 (pairing rounds would trade one noisy sample for another).
    overhead = round(wake - raw_first, 1)
    paired = round(statistics.median(w - r for w, r in zip(wakes, raw_fb, strict=True)) * 1000, 1)
    print(f"wake (connect -> first byte)   p50 {wake} ms  p90 {ms(wakes, 0.9)} ms")
    print(f"API restore (POST /restore)    p50 {api_restore} ms")
    print(f"raw restore (spawn -> cont)    p50 {ms(raws)} ms")
    print(f"raw restore + first byte       p50 {raw_first} ms")
    print(f"vmfleet's overhead over raw    p50 {overhead} ms (median of round pairs {paired} ms)")
    print(
        f"throughput mapped {mapped:.0f} MiB/s, the QEMU's command-line forward {direct:.0f} MiB/s"
    )
    summary.add(
        "wake: connect -> first byte p50",
        wake,
        unit="ms",
        baseline=api_restore,
        baseline_name="POST /restore p50",
        ratio=round(wake / api_restore, 2),
        goal="<= 1.3x API restore",
        met=wake <= 1.3 * api_restore,
        issue="16",
    )
    summary.add(
        "wake overhead over a raw QEMU restore + first byte, p50",
        overhead,
        unit="ms",
        baseline=raw_first,
        baseline_name="raw -incoming restore + GET first byte p50",
        goal="< 100 ms",
        met=overhead < 100,
        issue="16",
    )
    summary.add(
        "Running instance throughput through the mapped port",
        round(mapped, 1),
        unit="MiB/s",
        baseline=round(direct, 1),
        baseline_name="the same QEMU's command-line forward",
        ratio=round(mapped / direct, 2),
        goal=">= 0.9x",
        met=mapped >= 0.9 * direct,
        issue="16",
    )
    summary.notes.append(f"raw restore spawn -> cont p50 {ms(raws)} ms")


if __name__ == "__main__":
    main()
