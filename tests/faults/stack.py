"""The fleet the fault tests break: a 3-node NATS cluster, one `vmfleet worker` and one
`vmfleet gateway`, each a real process (R3 streams and buckets), and what the tests use to
drive it through its HTTP API and to look at what is really on the host.

Everything here is synchronous: a call that must be in flight while a fault lands runs in
a thread of its own (:meth:`Stack.in_flight`); NATS is asked through short-lived
connections (:meth:`Stack.bus`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import nats
from nats.js import JetStreamContext

from schemas.subjects import Subjects
from tests.support.cluster import NatsCluster
from tests.support.fleet import WorkerProcess
from tests.support.gateway_process import GatewayProcess

__all__ = ["Answer", "Reality", "Stack", "qemu_pids"]

T = TypeVar("T")

#: A client waits this long for one answer before it gives up and retries (the SDK's own
#: read timeout is 60 s; the gateway answers 504 at 55 s).
CALL_TIMEOUT_S = 30.0
#: How long a client keeps retrying a call that failed in a retryable way.
RETRY_BOUND_S = 180.0
#: The guest's app prints this once per boot.
UP_MARKER = "vmfleet-guest-up"
APP_CMD = ["/bin/sh", "-c", f"echo {UP_MARKER}; while true; do sleep 1; done"]


@dataclass(frozen=True)
class Answer:
    """One HTTP call's outcome: a response, or the transport error in its place."""

    status: int | None
    body: Any = None
    error: str | None = None
    retry_hint: bool = False

    @property
    def retryable(self) -> bool:
        """What a client should retry: no answer at all, or 5xx with ``x-should-retry``."""
        return self.status is None or (self.status >= 500 and self.retry_hint)

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None

    def short(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return f"{self.status} {self.code}" if self.code else str(self.status)


def qemu_pids(marker: str) -> list[int]:
    """Live (non-zombie) QEMU processes whose command line contains ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
            stat = (cmdline.parent / "stat").read_text()
        except OSError:
            continue
        zombie = stat[stat.rindex(")") + 2] == "Z"
        if b"qemu-system" in text and marker.encode() in text and not zombie:
            found.append(int(cmdline.parent.name))
    return found


@dataclass
class Reality:
    """What is on the host for one instance, whatever its record says."""

    qemu: list[int]
    pid_file: int | None
    sockets: list[str]
    snapshot: bool
    guest_dir: bool


@dataclass
class Stack:
    cluster: NatsCluster
    worker: WorkerProcess
    gateway: GatewayProcess
    prefix: str
    image: str
    #: The volume the attach cells attach (made by the package fixture).
    volume_id: str = ""
    #: Faults land a while into each op: its duration as measured fault-free.
    durations: dict[str, float] = field(default_factory=dict)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4))

    @property
    def host(self) -> str:
        return self.worker.host_id

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    # -- HTTP --------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        json: object = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> Answer:
        headers = dict(self.gateway.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        try:
            response = httpx.request(
                method,
                f"{self.gateway.base_url}{path}",
                headers=headers,
                json=json,
                timeout=httpx.Timeout(timeout_s, connect=5),
            )
        except httpx.HTTPError as exc:
            return Answer(status=None, error=f"{type(exc).__name__}: {exc}")
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = response.text
        return Answer(
            status=response.status_code,
            body=body,
            retry_hint=response.headers.get("x-should-retry") == "true",
        )

    def in_flight(self, method: str, path: str, **kwargs: Any) -> Future[Answer]:
        """Send a call from another thread: the caller injects a fault meanwhile."""
        return self._pool.submit(self.call, method, path, **kwargs)

    def retry(self, method: str, path: str, *, key: str, json: object = None) -> tuple[Answer, int]:
        """Repeat a call with the same ``Idempotency-Key`` until it is answered in a way a
        retry cannot change; return that answer and how many calls it took."""
        deadline = time.monotonic() + RETRY_BOUND_S
        attempts = 0
        while True:
            attempts += 1
            answer = self.call(method, path, key=key, json=json)
            if not answer.retryable or time.monotonic() > deadline:
                return answer, attempts
            time.sleep(1)

    def ok(self, method: str, path: str, *, json: object = None, timeout_s: float = 120) -> Any:
        """A fault-free call that must succeed (retrying what is retryable)."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.call(method, path, json=json, timeout_s=timeout_s)
            if answer.status is not None and answer.status < 300:
                return answer.body
            if not answer.retryable or time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: {answer.short()}: {answer.body}")
            time.sleep(1)

    def instances(self) -> list[dict[str, Any]]:
        answer = self.call("GET", "/instances")
        assert answer.status == 200, f"GET /instances: {answer.short()}"
        return list(answer.body)

    def instance(self, iid: str) -> dict[str, Any] | None:
        answer = self.call("GET", f"/instances/{iid}")
        if answer.status == 404:
            return None
        assert answer.status == 200, f"GET /instances/{iid}: {answer.short()}"
        return dict(answer.body)

    def create_body(self, name: str, **fields: object) -> dict[str, object]:
        return {
            "name": name,
            "image": self.image,
            "size": "256MB",
            "vcpus": 1,
            "overlay_size": "1GB",
            "cmd": APP_CMD,
            "host": self.host,
            **fields,
        }

    def timed(self, op: str, method: str, path: str, *, json: object = None) -> Any:
        """A fault-free call; its duration is remembered as the op's expected one."""
        started = time.monotonic()
        body = self.ok(method, path, json=json)
        self.durations.setdefault(op, time.monotonic() - started)
        return body

    # -- the guest ---------------------------------------------------------------------------

    def guest_dir(self, iid: str, host: WorkerProcess | None = None) -> Path:
        return (host or self.worker).data_dir / "guests" / iid

    def boots_seen(self, iid: str) -> int:
        try:
            text = (self.guest_dir(iid) / "logs" / "app.log").read_text(errors="replace")
        except OSError:
            return 0
        return text.count(UP_MARKER)

    def wait_guest_up(self, iid: str, boots_before: int, timeout_s: float = 120) -> None:
        """Until the guest's app has printed its marker once more than ``boots_before``."""
        deadline = time.monotonic() + timeout_s
        while self.boots_seen(iid) <= boots_before:
            assert time.monotonic() < deadline, f"guest {iid} did not come up"
            time.sleep(0.2)

    def reality(self, iid: str, host: WorkerProcess | None = None) -> Reality:
        root = self.guest_dir(iid, host)
        pid: int | None = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((root / "vmm.pid").read_text())
        run = root / "run"
        sockets = sorted(p.name for p in run.glob("*.sock")) if run.is_dir() else []
        snapshot = root / "snapshots" / "snapshot-latest"
        return Reality(
            qemu=qemu_pids(f"{root}/"),
            pid_file=pid,
            sockets=sockets,
            snapshot=snapshot.is_dir() and any(snapshot.iterdir()),
            guest_dir=root.is_dir(),
        )

    def kill_qemu(self, iid: str) -> list[int]:
        pids = qemu_pids(f"{self.guest_dir(iid)}/")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    # -- NATS --------------------------------------------------------------------------------

    def bus(self, query: Callable[[JetStreamContext], Awaitable[T]], timeout_s: float = 10) -> T:
        """Run one query against the cluster on a connection of its own."""

        async def run() -> T:
            with anyio.fail_after(timeout_s):
                nc = await nats.connect(
                    self.cluster.urls, connect_timeout=2, max_reconnect_attempts=2
                )
                try:
                    return await query(nc.jetstream())
                finally:
                    await nc.close()

        return anyio.run(run)

    def commands_leader(self) -> int:
        """Index (in ``cluster.servers``) of the server leading the commands stream."""

        async def leader(js: JetStreamContext) -> str:
            info = await js.stream_info(self.subjects.commands_stream)
            assert info.cluster is not None and info.cluster.leader
            return info.cluster.leader

        deadline = time.monotonic() + 60
        while True:  # a server restarted by the cell before may still be catching up
            try:
                return int(self.bus(leader).removeprefix("n"))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def commands_settled(self, host: str | None = None) -> bool:
        """Nothing queued for the host and nothing delivered but unacknowledged."""

        async def pending(js: JetStreamContext) -> tuple[int, int]:
            info = await js.consumer_info(
                self.subjects.commands_stream, self.subjects.command_consumer(host or self.host)
            )
            return info.num_pending, info.num_ack_pending

        try:
            return self.bus(pending) == (0, 0)
        except Exception:
            return False  # a leader being elected: not settled yet

    # -- restoring what a fault killed -------------------------------------------------------

    def restart_worker(self) -> None:
        self.worker.start()

    def restart_gateway(self) -> None:
        self.gateway.start()
        self.gateway.wait_ready()

    def restart_nats(self, index: int) -> None:
        server = self.cluster.servers[index]
        server.start()
        server.wait_ready(60)

    def wait_host_live(self, host: str | None = None, timeout_s: float = 120) -> None:
        """Until the gateway lists the host (its heartbeat is fresh)."""
        deadline = time.monotonic() + timeout_s
        wanted = host or self.host
        while True:
            answer = self.call("GET", "/hosts")
            if answer.status == 200 and any(h.get("id") == wanted for h in answer.body):
                return
            assert time.monotonic() < deadline, f"host {wanted} never became live"
            time.sleep(0.3)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@contextlib.contextmanager
def deadline_loop(timeout_s: float, what: str) -> Iterator[Callable[[], None]]:
    """``tick()`` sleeps a little, or fails the test once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s

    def tick() -> None:
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g}s"
        time.sleep(0.3)

    yield tick
