"""A real `vmfleet worker` process, and a client that speaks to it over NATS."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from cli.embedded_nats import free_port
from gateway.commands import CommandSender
from schemas.clock import utc_now as now
from schemas.codec import decode_instance_record
from schemas.messages import AnyCommand, CommandResult, Delete, InstanceRecord
from schemas.subjects import Subjects
from tests.support.processes import live_children

__all__ = ["FleetClient", "WorkerProcess", "now"]

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


class WorkerProcess:
    """`vmfleet worker` in a process of its own, so tests can SIGKILL it."""

    def __init__(self, nats_url: str, prefix: str, assets: Path, **env: str) -> None:
        self.host_id = "h" + secrets.token_hex(3)
        # Short: unix socket paths below it must stay within 107 bytes.
        self.data_dir = Path(tempfile.mkdtemp(prefix="vw", dir="/tmp"))
        self.env = {
            **os.environ,
            "NATS_URL": nats_url,
            "VMFLEET_HOST_ID": self.host_id,
            "VMFLEET_DATA_DIR": str(self.data_dir),
            "VMFLEET_ASSETS_DIR": str(assets),
            "VMFLEET_SUBJECT_PREFIX": prefix,
            "VMFLEET_LOG_LEVEL": "INFO",
            "VMFLEET_TEMPLATES": "off",  # no background template builds in tests
            "VMFLEET_METRICS_ADDR": f"127.0.0.1:{free_port()}",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}-worker.log"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.env['VMFLEET_METRICS_ADDR']}/metrics"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [VMFLEET, "worker"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to clean up (its VMs keep running)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def vmm_pids(self) -> list[int]:
        """QEMU processes of this worker's instances, alive or adopted by init."""
        pids = []
        for pid_file in self.data_dir.glob("guests/*/vmm.pid"):
            pid = int(pid_file.read_text())
            if Path(f"/proc/{pid}").exists():
                pids.append(pid)
        return pids

    def qemu_processes(self) -> list[int]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes()
            except OSError:
                continue
            if b"qemu-system" in text and str(self.data_dir).encode() in text:
                found.append(int(cmdline.parent.name))
        return found

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.qemu_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, name in live_children():
            if name.startswith("qemu"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)


class FleetClient:
    """What a gateway does, reduced to what worker tests need."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)
        self.sender = CommandSender(nc, self.subjects, timeout_s=120)

    @classmethod
    async def connect(cls, nats_url: str, prefix: str) -> FleetClient:
        return cls(await nats.connect(nats_url), prefix)

    async def send(self, host: str, cmd: AnyCommand, timeout_s: float = 120) -> CommandResult:
        return await self.sender.send(host, cmd, timeout_s=timeout_s)

    async def record(self, instance_id: str) -> InstanceRecord | None:
        kv = await self.nc.jetstream().key_value(self.subjects.instances_bucket)
        try:
            entry = await kv.get(instance_id)
        except KeyNotFoundError:
            return None
        return decode_instance_record(entry.value) if entry.value else None

    async def wait_for_host(self, host: str, timeout_s: float = 120) -> None:
        with anyio.fail_after(timeout_s):
            while True:
                try:
                    kv = await self.nc.jetstream().key_value(self.subjects.hosts_bucket)
                    await kv.get(host)
                    return
                except Exception:
                    await anyio.sleep(0.2)

    async def delete_all(self, host: str) -> None:
        kv = await self.nc.jetstream().key_value(self.subjects.instances_bucket)
        try:
            keys = await kv.keys()
        except Exception:
            return
        for key in keys:
            await self.send(host, Delete(id=f"del-{key}", instance_id=key, issued_at=now()))

    async def close(self) -> None:
        await self.nc.close()
