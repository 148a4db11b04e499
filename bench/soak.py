"""Soak: create / standby / restore / attach / detach / delete, again and again, across
hosts, with real guests; does anything grow that should not?

A `vmfleet dev` stack (NATS, gateway, worker ``soak-0``) and ``--hosts - 1`` more
`vmfleet worker` processes on its NATS (``soak-1``...), each with a data dir of its own;
one 1 GB volume per host; at most one guest per host at a time (QEMU, TCG here). A fixed
seed picks each next operation among those the current states allow, so two runs with
the same seed and outcomes do the same things. Every call's outcome is counted by
operation, status and code.

Resources are sampled at the start (every host warmed up: its image pulled, no
instances), once a minute, and at the end, after every instance is deleted again:
processes and open files of the stack (VMMs counted apart), RSS of the vmfleet processes
and nats-server, VMM RSS, and disk (the hosts' data without their command ledgers; the
ledgers, which keep one small file per command for a day by design; the NATS store,
which keeps logs and state events up to its limits by design). Goal ([8/9]): flat over
time: the end, with no instances, as the start (same processes, open files within a
few, RSS within 20%, the hosts' data within 1 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.support import (
    ASSETS,
    VMFLEET,
    DevStack,
    Summary,
    children_of,
    dev_stack,
    disk_usage,
    is_zombie,
    open_files,
    pids_mentioning,
    proc_status,
    stop_process,
    wait_for,
)
from cli.embedded_nats import free_port
from schemas.codec import decode_volume_record
from schemas.subjects import Subjects
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry

MIB = 1 << 20
APP = ["/bin/sh", "-c", "echo soak up; i=0; while :; do i=$((i+1)); echo tick $i; sleep 2; done"]
VMM_NAMES = ("qemu-system-x86", "cloud-hyperviso")


@dataclass
class Guest:
    id: str
    host: str
    state: str
    volume: str | None = None


@dataclass
class Sample:
    at_s: float
    label: str
    instances: int
    processes: int
    vmms: int
    zombies: int
    open_files: int
    rss: int
    vmm_rss: int
    data_disk: int
    ledger_disk: int
    nats_disk: int


@dataclass
class Soak:
    stack: DevStack
    client: httpx.Client
    image: str
    hosts: list[str]
    data_dirs: list[Path]
    workers: list[subprocess.Popen[bytes]]
    rng: random.Random
    guests: dict[str, Guest] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)  # volume id -> host
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: dict[str, str] = field(default_factory=dict)
    made: int = 0

    # -- operations --------------------------------------------------------------------------

    def call(self, op: str, method: str, path: str, **kwargs: object) -> httpx.Response | None:
        try:
            response = self.client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            self.outcomes[f"{op} transport {type(exc).__name__}"] += 1
            return None
        if response.is_success:
            self.outcomes[f"{op} ok"] += 1
            return response
        try:
            code = str(response.json().get("code", ""))
        except ValueError:
            code = ""
        kind = f"{op} {response.status_code} {code}".strip()
        self.outcomes[kind] += 1
        self.errors.setdefault(kind, response.text[:200])
        return None

    def create(self, host: str) -> None:
        self.made += 1
        body = {
            "name": f"soak-{self.made}",
            "image": self.image,
            "size": "256MB",
            "overlay_size": "256MB",
            "vcpus": 1,
            "network": {"enabled": False},
            "host": host,
            "cmd": APP,
        }
        response = self.call("create", "POST", "/instances", json=body)
        if response is not None:
            record = response.json()
            self.guests[record["id"]] = Guest(record["id"], host, record["state"])

    def lifecycle(self, op: str, guest: Guest) -> None:
        response = self.call(op, "POST", f"/instances/{guest.id}/{op}")
        self.refresh(guest, response)

    def attach(self, guest: Guest, volume: str) -> None:
        response = self.call(
            "attach",
            "POST",
            f"/instances/{guest.id}/volumes/{volume}",
            json={"mount_path": "/data", "readonly": False},
        )
        if response is not None:
            guest.volume = volume
        self.refresh(guest, response)

    def detach(self, guest: Guest) -> None:
        response = self.call("detach", "DELETE", f"/instances/{guest.id}/volumes/{guest.volume}")
        if response is not None:
            guest.volume = None
        self.refresh(guest, response)

    def delete(self, guest: Guest) -> None:
        if self.call("delete", "DELETE", f"/instances/{guest.id}") is not None:
            del self.guests[guest.id]
        else:
            self.refresh(guest, None)

    def refresh(self, guest: Guest, response: httpx.Response | None) -> None:
        """The state after an operation: from its answer, or read again after an error."""
        if response is None:
            response = self.client.get(f"/instances/{guest.id}")
            if response.status_code == 404:
                self.guests.pop(guest.id, None)
                return
        record = response.json()
        guest.state = record.get("state", guest.state)
        mounted = [v.get("volume_id") for v in record.get("volumes") or []]
        guest.volume = mounted[0] if mounted else None

    def step(self) -> str:
        """One operation, chosen by the seeded generator among those allowed now."""
        choices: list[tuple[str, object]] = []
        used = {g.host for g in self.guests.values()}
        for host in self.hosts:
            if host not in used:
                choices.append(("create", host))
        for guest in self.guests.values():
            if guest.state == "Running":
                choices.append(("standby", guest))
            if guest.state == "Standby":
                choices.append(("restore", guest))
            if guest.state in ("Running", "Stopped") and guest.volume is None:
                free = [v for v, h in self.volumes.items() if h == guest.host]
                taken = {g.volume for g in self.guests.values()}
                free = [v for v in free if v not in taken]
                if free:
                    choices.append(("attach", (guest, free[0])))
            if guest.volume is not None and guest.state in ("Running", "Stopped"):
                choices.append(("detach", guest))
            choices.append(("delete", guest))
        op, target = self.rng.choice(choices)
        if op == "create":
            self.create(target)  # type: ignore[arg-type]
        elif op in ("standby", "restore"):
            self.lifecycle(op, target)  # type: ignore[arg-type]
        elif op == "attach":
            assert isinstance(target, tuple)
            self.attach(*target)
        elif op == "detach":
            self.detach(target)  # type: ignore[arg-type]
        else:
            self.delete(target)  # type: ignore[arg-type]
        return op

    def delete_all(self) -> None:
        for guest in list(self.guests.values()):
            self.delete(guest)

    # -- resources ---------------------------------------------------------------------------

    def sample(self, started: float, label: str) -> Sample:
        pids: dict[int, str] = {self.stack.proc.pid: "vmfleet"}
        procs: list[subprocess.Popen[Any]] = [self.stack.proc, *self.workers]
        for proc in procs:
            pids[proc.pid] = "vmfleet"
            pids.update(children_of(proc.pid))
        zombies = [p for p in pids if is_zombie(p)]
        vmms = [p for p, name in pids.items() if name in VMM_NAMES and p not in zombies]
        others = [p for p in pids if p not in vmms and p not in zombies]
        ledgers = sum(disk_usage(d / "commands") for d in self.data_dirs)
        data = sum(disk_usage(d) for d in self.data_dirs)
        nats_store = disk_usage(self.data_dirs[0] / "nats")
        return Sample(
            at_s=time.monotonic() - started,
            label=label,
            instances=len(self.guests),
            processes=len(others),
            vmms=len(vmms),
            zombies=len(zombies),
            open_files=sum(open_files(p) for p in others),
            rss=sum(proc_status(p).get("VmRSS", 0) for p in others),
            vmm_rss=sum(proc_status(p).get("VmRSS", 0) for p in vmms),
            data_disk=data - ledgers - nats_store,
            ledger_disk=ledgers,
            nats_disk=nats_store,
        )


async def volume_host(nats_url: str, volume_id: str) -> str:
    """The host a volume is on (the API's Volume, as hypeman's, does not say; its record
    in the volumes bucket does)."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(Subjects("vmfleet").volumes_bucket)
        record = decode_volume_record((await kv.get(volume_id)).value or b"")
        assert record.host is not None, record
        return record.host
    finally:
        await nc.close()


def start_worker(nats_url: str, host: str, data: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "VMFLEET_HOST_ID": host,
        "VMFLEET_DATA_DIR": str(data),
        "VMFLEET_ASSETS_DIR": str(ASSETS),
        "VMFLEET_LOG_LEVEL": "WARNING",
    }
    env.pop("JWT_SECRET", None)
    log = (data.parent / f"{host}.log").open("wb")
    return subprocess.Popen([VMFLEET, "worker"], env=env, stderr=log, stdout=log)


def table(samples: list[Sample]) -> list[str]:
    out = [
        "| at | when | instances | processes | VMMs | zombies | open files | RSS | VMM RSS | "
        "hosts' data | ledgers | NATS store |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in samples:
        out.append(
            f"| {s.at_s / 60:.1f} min | {s.label} | {s.instances} | {s.processes} | {s.vmms} | "
            f"{s.zombies} | "
            f"{s.open_files} | {s.rss / MIB:.1f} MiB | {s.vmm_rss / MIB:.1f} MiB | "
            f"{s.data_disk / MIB:.1f} MiB | {s.ledger_disk / MIB:.2f} MiB | "
            f"{s.nats_disk / MIB:.1f} MiB |"
        )
    return out


def run_loop(soak: Soak, minutes: float) -> tuple[list[Sample], int, dict[str, int]]:
    """Volumes, a warm-up, then operations until the time is up; samples once a minute."""
    client = soak.client
    for _ in soak.hosts:  # one volume per host (each goes where most disk is free)
        created = client.post("/volumes", json={"name": f"v{len(soak.volumes)}", "size_gb": 1})
        assert created.status_code == 201, created.text
        volume_id = created.json()["id"]
        soak.volumes[volume_id] = anyio.run(volume_host, soak.stack.nats_url, volume_id)
    for host in soak.hosts:  # warm-up: every host pulls the image and boots once
        soak.create(host)
    soak.delete_all()
    warm = dict(soak.outcomes)
    soak.outcomes.clear()
    started = time.monotonic()
    samples = [soak.sample(started, "start (no instances)")]
    ops = 0
    deadline = started + minutes * 60
    next_sample = started + 60
    while time.monotonic() < deadline:
        soak.step()
        ops += 1
        if time.monotonic() >= next_sample:
            samples.append(soak.sample(started, f"minute {len(samples)}"))
            next_sample += 60
    samples.append(soak.sample(started, "loop end"))
    soak.delete_all()
    time.sleep(3)  # VMMs reaped, logs shipped
    samples.append(soak.sample(started, "end (all deleted)"))
    return samples, ops, warm


def main(args: argparse.Namespace) -> None:
    # Short: the guests' unix socket paths live below it (at most 107 bytes).
    work = Path(tempfile.mkdtemp(prefix="vsk", dir="/tmp"))
    registry = LocalRegistry(work / "registry")
    registry.start()
    workers: list[subprocess.Popen[bytes]] = []
    summary = Summary("soak", {"minutes": args.minutes, "seed": args.seed, "hosts": args.hosts})
    try:
        image = push_image(build_busybox_image(work / "oci"), registry.address, "soak:latest")
        hosts = [f"soak-{i}" for i in range(args.hosts)]
        data_dirs = [work / "h0"] + [work / f"h{i}" for i in range(1, args.hosts)]
        with dev_stack(data_dirs[0], free_port(), host_id=hosts[0], banner_timeout_s=180) as stack:
            soak: Soak | None = None
            try:
                for host, data in zip(hosts[1:], data_dirs[1:], strict=True):
                    data.mkdir(parents=True)
                    workers.append(start_worker(stack.nats_url, host, data))
                client = httpx.Client(base_url=stack.base_url, headers=stack.headers, timeout=300)
                wait_for(
                    lambda: {h["id"] for h in client.get("/hosts").json()} >= set(hosts),
                    timeout_s=300,
                    what="workers start",
                )
                soak = Soak(
                    stack, client, image, hosts, data_dirs, workers, random.Random(args.seed)
                )
                samples, ops, warm = run_loop(soak, args.minutes)
                client.close()
            finally:
                if soak is not None:
                    with contextlib.suppress(Exception):
                        soak.delete_all()
                for worker in workers:  # before the dev stack takes NATS away
                    stop_process(worker, 120)
        first, last = samples[0], samples[-1]
        checks = {
            "processes": last.processes == first.processes and last.vmms == 0,
            "zombies": last.zombies <= first.zombies,
            "open files": last.open_files <= first.open_files + 5,
            "RSS": last.rss <= first.rss * 1.2,
            "hosts' data": last.data_disk <= first.data_disk + MIB,
        }
        ok_ops = sum(n for k, n in soak.outcomes.items() if k.endswith(" ok"))
        lines = [
            f"soak: {args.minutes:g} min, seed {args.seed}, {len(hosts)} hosts "
            f"({', '.join(hosts)}), {ops} operations; outcomes below include the final "
            f"clean-up ({ok_ops} ok); warm-up {warm}",
            "",
            *table(samples),
            "",
            "outcomes by operation, status and code:",
            *[f"  {n:5d} {k}" for k, n in sorted(soak.outcomes.items())],
            *[f"  first {k}: {v}" for k, v in soak.errors.items()],
            "",
            "end vs start (flat is the goal): "
            + ", ".join(f"{k} {'flat' if v else 'GREW'}" for k, v in checks.items()),
            f"  ledgers grew {(last.ledger_disk - first.ledger_disk) / MIB:.2f} MiB (one file "
            "per command, pruned after a day); NATS store grew "
            f"{(last.nats_disk - first.nats_disk) / MIB:.1f} MiB (logs/events, up to its limits)",
        ]
        print("\n".join(lines))
        errors = sum(n for k, n in soak.outcomes.items() if not k.endswith(" ok"))
        summary.add(
            "soak operations (errors)",
            f"{ops} ({errors} errors)",
            goal="no errors",
            met=errors == 0,
            issue="8/9",
        )
        summary.add(
            "soak resource growth, end vs start",
            ", ".join(f"{k} {'flat' if v else 'GREW'}" for k, v in checks.items()),
            baseline=f"{first.processes} procs, {first.open_files} fds, {first.rss / MIB:.0f} MiB",
            baseline_name="start sample",
            goal="flat",
            met=all(checks.values()),
            issue="8/9",
        )
        summary.notes = lines[:1]
        if args.json:
            summary.emit()
    finally:
        for worker in workers:
            stop_process(worker, 120)
        registry.stop()
        for pid in pids_mentioning(str(work)):  # a VMM left behind would be ours: stop it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hosts", type=int, default=2, help="the dev stack's and more workers")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    main(parser.parse_args())
