"""Wiring of the worker daemon: boot assets, NATS, the engine, and their ordered shutdown.

Start-up: boot assets (kernel, initrd), the hypervisor (VMFLEET_HYPERVISOR, probed by
booting them; worker.drivers.select) → NATS and its layout → the records
publisher → recovery (adopt VMMs, reconcile records, publish them) → heartbeats, log
shipping, the VMM watcher → the command consumer. Only then is the worker "started".

Shutdown (cancellation): the consumer and the rest stop first; VMs keep running for the
next worker unless ``stop_instances_on_exit`` (``vmfleet dev``); the publisher flushes what
is queued; then the NATS connection drains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from natsbus import PublishDenials, close, connect, provision
from schemas.api import Hypervisor, InstanceState
from schemas.codec import encode
from schemas.errors import NotFound
from schemas.messages import InstanceRecord, StateEvent
from schemas.subjects import Subjects
from worker.agent import AgentHub, track_instance
from worker.autostandby.controller import AutoStandbyController
from worker.autostandby.metrics import StandbyByCause
from worker.autostandby.service import serve_autostandby
from worker.commands import CommandConsumer
from worker.config import WorkerConfig
from worker.dispatch import Dispatcher
from worker.drivers.select import DriverSet, check_hypervisor_setting, choose_hypervisor
from worker.engine import HostEngine
from worker.expiry import reap_expired
from worker.guest import DEFAULT_AGENT, boot_kernel, ensure_initrd, ensure_kernel
from worker.health import supervise_health
from worker.heartbeat import heartbeat_loop
from worker.host import HostLimits, read_capacity
from worker.images import ImageCache, ImagePuller
from worker.ledger import Ledger
from worker.lifecycle.context import BootAssets, LocalInstance, OpContext, Transitioned
from worker.logs import LogShipper
from worker.metrics import WorkerMetrics
from worker.network import BridgeNetwork, check_bridge_host
from worker.publisher import PublishStalled, RecordPublisher
from worker.queries import serve_queries
from worker.sessions import serve_sessions
from worker.snapshots.schedule import run_schedules
from worker.snapshots.service import SnapshotService
from worker.snapshots.store import SnapshotStore
from worker.storage import Storage
from worker.supervisor import supervise_restarts
from worker.templates import TemplateManager
from worker.transfer import HostCache, open_store
from worker.transfer.move import Mover
from worker.transfer.snapshots import SnapshotTransfers
from worker.usage import InstanceUsageCollector, local_instances
from worker.volumes import VolumeStore
from worker.wake import WakeManager, attach_wake
from worker.wake.metrics import WakeMetrics

__all__ = ["prepare_host", "run_worker"]

log = logging.getLogger(__name__)


async def prepare_host(config: WorkerConfig) -> tuple[BootAssets, DriverSet]:
    """The guest's kernel (its PVH vmlinux, when it has one), initrd and agent, then the
    hypervisor (whose probe boots them)."""
    assets = config.assets_dir or config.data_dir
    kernel = await ensure_kernel(assets, kernel=config.kernel, initrd=config.initrd)
    initrd = await ensure_initrd(assets, kernel)
    # An operator's own initrd has no init of ours to run an agent.
    agent = guest_agent(config) if config.initrd is None else None
    booted = await boot_kernel(kernel.bzimage)
    host = await choose_hypervisor(
        config.hypervisor,
        network_mode=config.network.mode,
        ch_binary=config.ch_binary,
        assets_dir=assets,
        kernel=booted,
        initrd=initrd,
    )
    boot = BootAssets(kernel=booted, initrd=initrd, accel=host.accel, agent=agent)
    return boot, host.drivers


def guest_agent(config: WorkerConfig) -> Path | None:
    """The guest agent binary every config disk gets; None (said in one line) when there is
    none: the guests then boot without one, and exec, cp and stat are refused."""
    path = config.agent_binary or DEFAULT_AGENT
    if path.is_file():
        return path
    log.error(
        "no guest agent at %s: exec, cp and stat will not work (build it with "
        "scripts/install.sh, or set VMFLEET_AGENT_BINARY)",
        path,
    )
    return None


def _agent_hub(boot: BootAssets) -> AgentHub:
    return AgentHub(agent_present=boot.agent is not None)


def _follow_instances(
    publisher: RecordPublisher, hub: AgentHub, driver: DriverSet
) -> tuple[Transitioned, Callable[[InstanceRecord], None]]:
    """The records' publisher and the agent hub both follow every instance."""

    def changed(inst: LocalInstance, previous: InstanceState | None) -> None:
        publisher.changed(inst.record, previous)
        track_instance(hub, driver, inst)

    def removed(record: InstanceRecord) -> None:
        publisher.deleted(record)
        hub.detach(record.id, "the instance was deleted")

    return changed, removed


async def run_worker(
    config: WorkerConfig,
    *,
    registry: CollectorRegistry | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled. Reports started once the worker takes commands."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    check_hypervisor_setting(
        config.hypervisor, network_mode=config.network.mode, ch_binary=config.ch_binary
    )
    if config.network.mode == "bridge":
        check_bridge_host()
    bridge = None
    if config.network.mode == "bridge":
        bridge = BridgeNetwork(config.network, config.data_dir)
        await bridge.setup()
    metrics = WorkerMetrics(registry or CollectorRegistry())
    boot, driver = await prepare_host(config)
    log.info("guest kernel %s, %s, accelerator %s", boot.kernel.name, driver.name, boot.accel)
    bus = dataclasses.replace(
        config.bus, on_reconnect=metrics.nats_reconnects.inc, denials=PublishDenials()
    )
    config = dataclasses.replace(config, bus=bus)
    nc = await connect(bus)
    try:
        await _serve(nc, config, metrics, driver, boot, bridge, task_status)
    finally:
        await close(nc)


async def _serve(
    nc: Client,
    config: WorkerConfig,
    metrics: WorkerMetrics,
    driver: DriverSet,
    boot: BootAssets,
    bridge: BridgeNetwork | None,
    task_status: TaskStatus[None],
) -> None:
    js = nc.jetstream()
    subjects = Subjects(config.subject_prefix)
    await provision(js, subjects, config.layout)
    publisher = RecordPublisher(js, subjects, config.host_id, denials=config.bus.denials)
    volumes = VolumeStore(config.data_dir, config.host_id, on_change=publisher.volume_changed)
    hub = _agent_hub(boot)
    on_transition, on_removed = _follow_instances(publisher, hub, driver)
    ctx = OpContext(
        host_id=config.host_id,
        storage=Storage(config.data_dir),
        driver=driver,
        images=ImageCache(config.data_dir / "images", config.insecure_registries),
        volumes=volumes,
        boot=boot,
        on_transition=on_transition,
        on_removed=on_removed,
        agent=hub,
        on_refused_transition=metrics.count_refused_transition,
        observe_pull=metrics.pull_duration.observe,
        observe_create_phase=metrics.observe_create_phase,
        network=config.network,
        bridge=bridge,
        limits=HostLimits.of(
            read_capacity(config.data_dir),
            cpu_ratio=config.cpu_overcommit,
            memory_ratio=config.memory_overcommit,
        ),
    )
    ctx.templates = _templates(config, driver, boot)
    engine = HostEngine(ctx)
    hub.on_news = functools.partial(_agent_news, engine)
    wake = attach_wake(engine, on_woke=WakeMetrics(metrics.registry).woke)
    async with anyio.create_task_group() as infra:
        await infra.start(publisher.run)
        await infra.start(hub.run)
        await infra.start(wake.run)  # before recovery: sleeping instances' ports come first
        try:
            await _run_components(nc, config, subjects, metrics, engine, publisher, task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await _shut_down(config, engine, publisher)
                hub.close()


async def _run_components(
    nc: Client,
    config: WorkerConfig,
    subjects: Subjects,
    metrics: WorkerMetrics,
    engine: HostEngine,
    publisher: RecordPublisher,
    task_status: TaskStatus[None],
) -> None:
    js = nc.jetstream()
    await engine.recover()
    if isinstance(engine.ctx.wake, WakeManager):
        engine.ctx.wake.arm_sleeping()  # before anything else: the next connection wakes them
    _follow_recovered(engine)
    mover, snapshot_transfers = await _transfers(js, subjects, config, engine, metrics)
    await mover.settle_interrupted()  # before this host's records are written again
    await _publish_everything(engine, publisher)
    hosts = await js.key_value(subjects.hosts_bucket)

    async def publish_line(subject: str, payload: bytes, msg_id: str) -> None:
        await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})

    shipper = LogShipper(
        engine.log_dirs,
        subjects,
        publish_line,
        max_line_bytes=config.layout.max_log_line_bytes,
        max_file_bytes=config.log_max_bytes,
        on_line=lambda source: metrics.log_lines.labels(source=source).inc(),
    )
    ledger = Ledger(config.data_dir / "commands")

    async def emit_event(event: StateEvent) -> None:
        await js.publish(subjects.state(config.host_id, event.instance_id), encode(event))

    def state_of(instance_id: str) -> InstanceState:
        return engine.get(instance_id).state if engine.has(instance_id) else InstanceState.STOPPED

    snapshots = SnapshotService(
        SnapshotStore(config.data_dir),
        await js.key_value(subjects.snapshots_bucket),
        config.host_id,
        emit=emit_event,
        state_of=state_of,
    )
    await snapshots.publish_missing()
    consumer = CommandConsumer(
        nc,
        subjects,
        config.host_id,
        Dispatcher(
            engine,
            engine.ctx.volumes,
            publisher,
            await js.object_store(subjects.archives_bucket),
            ImagePuller(
                await js.key_value(subjects.images_bucket), engine.ctx.images, config.host_id
            ),
            snapshots=snapshots,
            mover=mover,
            snapshot_transfers=snapshot_transfers,
        ),
        ledger,
        metrics,
    )
    async with anyio.create_task_group() as tg:
        beat = functools.partial(
            heartbeat_loop,
            hypervisors=[Hypervisor(engine.ctx.driver.name)],
            problem=consumer.problem,
        )
        await tg.start(beat, hosts, config, engine.usage)
        tg.start_soon(shipper.run)
        tg.start_soon(engine.watch_vmms)
        tg.start_soon(_count_instances, engine, metrics)
        tg.start_soon(reap_expired, engine)
        tg.start_soon(supervise_restarts, engine)
        tg.start_soon(supervise_health, engine)
        tg.start_soon(run_schedules, engine, snapshots)
        if engine.ctx.templates is not None:
            tg.start_soon(engine.ctx.templates.run)
        standby = AutoStandbyController(
            engine, engine.ctx.inbound, bridge=config.network.mode == "bridge"
        )
        await tg.start(standby.run)
        StandbyByCause(engine.records).register(metrics.registry)
        InstanceUsageCollector(lambda: local_instances(engine)).register(metrics.registry)
        await tg.start(serve_queries, nc, subjects, config.host_id, ledger, engine)
        await tg.start(serve_autostandby, nc, subjects, config.host_id, standby)
        await tg.start(serve_sessions, nc, subjects, config.host_id, engine, metrics)
        await tg.start(consumer.run)
        log.info("worker %s is taking commands", config.host_id)
        task_status.started()


def _agent_news(engine: HostEngine, instance_id: str, level: str, message: str) -> None:
    """An agent answered or was lost: a line in the instance's ops log."""
    with contextlib.suppress(NotFound):
        engine.ctx.oplog(engine.instance(instance_id), message, level=level)


def _follow_recovered(engine: HostEngine) -> None:
    """VMs adopted from the previous worker: the hub connects to their agents."""
    if engine.ctx.agent is None:
        return
    for record in engine.records():
        track_instance(engine.ctx.agent, engine.ctx.driver, engine.instance(record.id))


async def _count_instances(engine: HostEngine, metrics: WorkerMetrics) -> None:
    while True:
        counts = Counter(record.state for record in engine.records())
        for state in InstanceState:
            metrics.instances.labels(state=state.value).set(counts.get(state, 0))
        await anyio.sleep(2)


async def _transfers(
    js: JetStreamContext,
    subjects: Subjects,
    config: WorkerConfig,
    engine: HostEngine,
    metrics: WorkerMetrics,
) -> tuple[Mover, SnapshotTransfers]:
    """Instances moving between hosts and snapshots forked on other hosts, sharing one
    cache of what this host fetched (one fetch per bundle, one disk budget)."""
    store = await open_store(js, subjects)
    cache = HostCache(
        store,
        config.data_dir / "transfers",
        config.transfer_cache_bytes,
        observe=metrics.observe_transfer,
    )
    mover = Mover(engine, store, cache, await js.key_value(subjects.instances_bucket))
    snapshots = SnapshotTransfers(
        store,
        cache,
        SnapshotStore(config.data_dir),
        await js.key_value(subjects.snapshots_bucket),
        config.host_id,
    )
    return mover, snapshots


def _templates(config: WorkerConfig, driver: DriverSet, boot: BootAssets) -> TemplateManager | None:
    """Warm templates (VMFLEET_TEMPLATES): QEMU hosts only, since Cloud Hypervisor's API
    cannot give a restored disk another size."""
    if not config.templates or driver.name != "qemu":
        return None
    return TemplateManager(
        config.data_dir / "templates",
        driver,
        boot,
        budget_bytes=config.templates_disk_bytes,
        vmm_binary=getattr(driver.primary, "binary", None),
    )


async def _publish_everything(engine: HostEngine, publisher: RecordPublisher) -> None:
    """After recovery, the KV view is rewritten from this host's truth."""
    for record in engine.records():
        publisher.changed(record, None)
    for volume in engine.ctx.volumes.list():
        publisher.volume_changed(volume.id, volume)
    await publisher.forget_vanished(
        {record.id for record in engine.records()},
        {volume.id for volume in engine.ctx.volumes.list()},
    )


async def _shut_down(config: WorkerConfig, engine: HostEngine, publisher: RecordPublisher) -> None:
    if config.stop_instances_on_exit:
        with anyio.move_on_after(120):
            await engine.stop_all()
    with anyio.move_on_after(10) as scope:
        try:
            await publisher.flush()
        except PublishStalled:
            scope.cancel()
    if scope.cancel_called:
        publisher.abort()
    else:
        publisher.stop()
