"""Simulated hosts: a benchmark instrument for fleet-scale load tests of the control plane.

Never the default and never a VMFLEET_HYPERVISOR value; it lives in bench/ only, and a
result measured with it says nothing about VMs, only about the control plane around them.

Each simulated host runs the worker's real control-plane pieces on its own NATS
connection, wired as worker/daemon.py wires them:
- worker.commands.CommandConsumer (the durable pull consumer, per-instance ordering, the
  concurrency limiter, ack only after the outcome is recorded and answered),
- worker.dispatch.Dispatcher (errors become results; the publisher is flushed before the
  answer) with worker.ledger.Ledger (redelivered commands answered, not re-run),
- worker.publisher.RecordPublisher (instance records to KV, transitions to the states
  stream, in order), worker.queries.serve_queries,
- worker.heartbeat.heartbeat_loop, with the simulated capacity in the host record.

In place of worker.engine.HostEngine it has :class:`SimulatedEngine`: the same command
surface (execute, get, records, usage), the state table of worker.states (each change of
state checked against it), the same capacity account (worker.capacity: ``host_full`` past
capacity x overcommit) and the same sequence of record changes as the real create (record
in Created, image digest, Initializing, Running, last command id), but no disks, images,
networks or VMMs: an operation takes ``--op-delay-ms`` (default 0) instead of a VMM's
time.

`--bare` adds, per host, the floor bench/fleet.py compares with: a pull consumer on a
stream of its own that does for each message just what a create costs NATS at the least
(one KV put, one reply, one ack), with no vmfleet code.

Run by bench/fleet.py, one process per group of hosts:
    python bench/simulated_host.py --nats URL --prefix P --data DIR --hosts a,b,c
It prints "ready" once every host takes commands, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from natsbus import BusOptions, connect
from schemas.api import Hypervisor, InstanceState
from schemas.clock import utc_now
from schemas.errors import Conflict, NotFound
from schemas.messages import (
    AnyCommand,
    AttachVolume,
    Create,
    Delete,
    DetachVolume,
    InstanceRecord,
    MountSpec,
)
from schemas.subjects import Subjects
from worker.capacity import CapacityAccount
from worker.commands import CommandConsumer
from worker.config import WorkerConfig
from worker.dispatch import Dispatcher
from worker.heartbeat import heartbeat_loop
from worker.host import HostCapacity, HostLimits, HostUsage
from worker.ledger import Ledger
from worker.metrics import WorkerMetrics
from worker.publisher import RecordPublisher
from worker.queries import serve_queries
from worker.states import TRANSITIONS, Cause, Op, check_edge, check_transition
from worker.volumes import VolumeStore

__all__ = ["SimulatedEngine", "bare_stream", "run_hosts"]

log = logging.getLogger("bench.simulated_host")

MIB = 1 << 20
#: A label every simulated host carries, so GET /hosts shows what they are.
LABELS = {"simulated": "bench-instrument"}
#: Every simulated host has this image "ready" (a warm fleet).
IMAGE = "docker.io/library/busybox:latest"
IMAGE_DIGEST = "sha256:" + "5e" * 32
READY_IMAGES = (IMAGE_DIGEST, IMAGE)


def _disk_bytes(record: InstanceRecord) -> int:
    """An instance's overlay and volume overlays (Create.disk_bytes, of its record)."""
    return record.overlay_bytes + sum(m.overlay_bytes for m in record.volumes if m.overlay)


def bare_stream(prefix: str) -> StreamConfig:
    """The baseline's work queue (its own stream, beside vmfleet's)."""
    return StreamConfig(
        name=f"{prefix.upper()}_BARE",
        subjects=[f"{prefix}bare.cmd.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        duplicate_window=600.0,
    )


class SimulatedEngine:
    """HostEngine's command surface, for the control plane only (see the module doc)."""

    def __init__(
        self,
        host_id: str,
        limits: HostLimits,
        disk_free_bytes: int,
        *,
        on_transition: Callable[[InstanceRecord, InstanceState | None], None],
        on_removed: Callable[[InstanceRecord], None],
        op_delay_s: float = 0.0,
    ) -> None:
        self.host_id = host_id
        self._changed = on_transition
        self._removed = on_removed
        self._delay_s = op_delay_s
        self._records: dict[str, InstanceRecord] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self.capacity = CapacityAccount(
            host_id=host_id,
            limits=lambda: limits,
            records=self.records,
            disk_free=lambda: disk_free_bytes,
            # The sparse overlays are never written: each may still take all of its size.
            disk_unwritten=lambda: sum(_disk_bytes(r) for r in self._records.values()),
        )

    def get(self, instance_id: str) -> InstanceRecord:
        record = self._records.get(instance_id)
        if record is None:
            raise NotFound(f"instance {instance_id} not found")
        return record

    def records(self) -> Iterator[InstanceRecord]:
        return iter(list(self._records.values()))

    def usage(self) -> HostUsage:
        """As HostEngine.usage, with the image every simulated host has ready."""
        return self.capacity.usage(accel="tcg", images=READY_IMAGES)

    async def execute(self, cmd: AnyCommand) -> InstanceRecord | None:
        instance_id: str = cmd.instance_id  # type: ignore[union-attr]
        async with self._locks.setdefault(instance_id, anyio.Lock()):
            if isinstance(cmd, Create):
                if instance_id in self._records:
                    raise Conflict(f"instance {instance_id} already exists", code="already_exists")
                self.capacity.check_room_for(cmd)
                with self.capacity.reserving(cmd):
                    self._records[instance_id] = await self._create(cmd)
            elif isinstance(cmd, Delete):
                record = self.get(instance_id)
                await self._work()
                del self._records[instance_id]
                self._locks.pop(instance_id, None)
                self._removed(record)
                return None
            else:
                self._records[instance_id] = await self._transition(cmd)
            return self._save(self.get(instance_id), last_command_id=cmd.id)

    async def _create(self, cmd: Create) -> InstanceRecord:
        """The record changes of worker.lifecycle.create, without what they stand for."""
        record = cmd.new_record(host=self.host_id, hypervisor=Hypervisor.QEMU, created_at=utc_now())
        record = self._save(record, image_digest=IMAGE_DIGEST)  # the image is "pulled"
        await self._work()  # the overlay is "made", the VM "boots"
        for state in TRANSITIONS[Op.CREATE].path:
            changes = {"started_at": utc_now()} if state is InstanceState.RUNNING else {}
            record = self._set_state(record, state, Op.CREATE, **changes)
        return record

    async def _transition(self, cmd: AnyCommand) -> InstanceRecord:
        record = self.get(cmd.instance_id)  # type: ignore[union-attr]
        transition_op = Op(cmd.op)
        transition = check_transition(transition_op, record.state)
        await self._work()
        if isinstance(cmd, AttachVolume):
            mount = MountSpec(
                volume_id=cmd.volume_id,
                mount_path=cmd.mount_path,
                readonly=cmd.readonly,
                overlay=cmd.overlay,
                overlay_bytes=cmd.overlay_bytes,
            )
            record = self._save(record, volumes=[*record.volumes, mount])
        elif isinstance(cmd, DetachVolume):
            kept = [m for m in record.volumes if m.volume_id != cmd.volume_id]
            record = self._save(record, volumes=kept)
        for state in transition.path:
            changes: dict[str, object] = {}
            if state is InstanceState.RUNNING:
                changes = {"started_at": utc_now(), "has_snapshot": False}
            elif state is InstanceState.STANDBY:
                changes = {"has_snapshot": True, "stopped_at": utc_now()}
            elif state is InstanceState.STOPPED:
                changes = {"stopped_at": utc_now()}
            record = self._set_state(record, state, transition_op, **changes)
        return record

    async def _work(self) -> None:
        if self._delay_s:
            await anyio.sleep(self._delay_s)
        else:
            await anyio.lowlevel.checkpoint()

    def _set_state(
        self, record: InstanceRecord, state: InstanceState, cause: Cause, **changes: object
    ) -> InstanceRecord:
        """OpContext.set_state: an edge of the table, the new record, then whoever listens
        (the publisher)."""
        check_edge(record.state, state, cause)
        updated = msgspec.structs.replace(record, state=state, state_error=None, **changes)
        self._changed(updated, record.state)
        return updated

    def _save(self, record: InstanceRecord, **changes: object) -> InstanceRecord:
        """OpContext.save: a change of other fields than the state."""
        updated = msgspec.structs.replace(record, **changes)
        if updated.id in self._records:
            self._records[updated.id] = updated
        self._changed(updated, None)
        return updated


async def run_host(
    nats_url: str,
    prefix: str,
    host_id: str,
    data_dir: Path,
    capacity: HostCapacity,
    *,
    heartbeat_s: float,
    op_delay_s: float,
    bare: bool,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    config = WorkerConfig(
        host_id=host_id,
        data_dir=data_dir,
        bus=BusOptions(urls=(nats_url,), name=f"simulated-{host_id}"),
        subject_prefix=prefix,
        heartbeat_interval_s=heartbeat_s,
        address=f"simulated:{host_id}",
        labels=dict(LABELS),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    subjects = Subjects(prefix)
    nc = await connect(config.bus)
    try:
        js = nc.jetstream()
        publisher = RecordPublisher(js, subjects, host_id)
        engine = SimulatedEngine(
            host_id,
            HostLimits.of(
                capacity, cpu_ratio=config.cpu_overcommit, memory_ratio=config.memory_overcommit
            ),
            capacity.disk_free_bytes,
            on_transition=publisher.changed,
            on_removed=publisher.deleted,
            op_delay_s=op_delay_s,
        )
        ledger = Ledger(data_dir / "commands")
        volumes = VolumeStore(data_dir, host_id, on_change=publisher.volume_changed)
        dispatcher = Dispatcher(engine, volumes, publisher)  # type: ignore[arg-type]
        consumer = CommandConsumer(
            nc, subjects, host_id, dispatcher, ledger, WorkerMetrics(CollectorRegistry())
        )
        hosts = await js.key_value(subjects.hosts_bucket)
        async with anyio.create_task_group() as tg:
            await tg.start(publisher.run)
            try:
                beat = functools.partial(
                    heartbeat_loop, hypervisors=[Hypervisor.QEMU], capacity=capacity
                )
                await tg.start(beat, hosts, config, engine.usage)
                await tg.start(serve_queries, nc, subjects, host_id, ledger)
                await tg.start(consumer.run)
                if bare:
                    await tg.start(_bare_consumer, nc, prefix, host_id)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await publisher.flush()
                publisher.stop()
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.drain()


async def _bare_consumer(
    nc: Client, prefix: str, host_id: str, *, task_status: TaskStatus[None]
) -> None:
    """The floor: per message one KV put, one reply, one ack; no vmfleet code."""
    js = nc.jetstream()
    kv = await js.key_value(f"{prefix}_bare")
    subscription = await js.pull_subscribe(
        f"{prefix}bare.cmd.{host_id}",
        durable=f"bare_{host_id}",
        stream=bare_stream(prefix).name,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000),
    )
    limiter = anyio.CapacityLimiter(4)

    async def handle(msg: Msg) -> None:
        async with limiter:
            key = (msg.headers or {}).get("Nats-Msg-Id", "x")
            await kv.put(key, msg.data)
            await nc.publish(f"{prefix}bare.result.{key}", b"ok")
            await msg.ack()

    async with anyio.create_task_group() as tg:
        task_status.started()
        while True:
            try:
                messages = await subscription.fetch(batch=1, timeout=2)  # as the worker
            except TimeoutError:  # nats' own, or asyncio's when a probe used the deadline
                continue
            for msg in messages:
                tg.start_soon(handle, msg)


async def run_hosts(args: argparse.Namespace) -> None:
    capacity = HostCapacity(
        vcpus=args.vcpus,
        memory_bytes=args.memory_mib * MIB,
        disk_total_bytes=args.disk_gib << 30,
        disk_free_bytes=args.disk_gib << 30,
    )
    async with anyio.create_task_group() as tg:
        for host_id in args.hosts.split(","):
            await tg.start(
                functools.partial(
                    run_host,
                    args.nats,
                    args.prefix,
                    host_id,
                    Path(args.data) / host_id,
                    capacity,
                    heartbeat_s=args.heartbeat_s,
                    op_delay_s=args.op_delay_ms / 1000,
                    bare=args.bare,
                )
            )
        print("ready", flush=True)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--nats", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--data", required=True, help="a scratch directory (ledgers)")
    parser.add_argument("--hosts", required=True, help="comma-separated host ids")
    parser.add_argument("--vcpus", type=int, default=64, help="host CPUs (x4 overcommit)")
    parser.add_argument("--memory-mib", type=int, default=64 * 1024)
    parser.add_argument("--disk-gib", type=int, default=1024, help="free disk per host")
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--op-delay-ms", type=float, default=0.0)
    parser.add_argument("--bare", action="store_true", help="also serve the bare baseline")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    anyio.run(run_hosts, parser.parse_args())


if __name__ == "__main__":
    main()
