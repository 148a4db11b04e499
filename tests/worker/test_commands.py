"""The command consumer's promises, against a real nats-server: one instance's commands run
one at a time and in order, different instances' run side by side, and a worker asked to
stop finishes (and acks) the command it is running.

The executor here records what it is asked to do instead of driving VMs: what is under
test is the consumer's scheduling, which the VM-backed tests in test_daemon.py cannot
observe. The real executor is wired in by worker/daemon.py and tested there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import CollectorRegistry

from cli.embedded_nats import NatsServerProcess
from natsbus import BusOptions, Layout, close, connect, provision
from schemas.codec import decode_command_result, encode
from schemas.messages import AnyCommand, CommandResult, Stop
from schemas.subjects import Subjects
from tests.support.fleet import now
from worker.commands import ACK_WAIT_S, FETCH_WAIT_S, CommandConsumer, CommandsUnreachable
from worker.ledger import Ledger
from worker.metrics import WorkerMetrics

pytestmark = pytest.mark.anyio

HOST = "h1"


class RecordingExecutor:
    """Takes ``hold_s`` per command and notes when each started and ended."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.spans: dict[str, tuple[float, float]] = {}
        self.running = 0
        self.most_at_once = 0

    async def __call__(self, cmd: AnyCommand) -> CommandResult:
        start = anyio.current_time()
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await anyio.sleep(self.hold_s)
        finally:
            self.running -= 1
        self.spans[cmd.id] = (start, anyio.current_time())
        return CommandResult(command_id=cmd.id, ok=True)


@pytest.fixture
async def nc(nats_url: str, subject_prefix: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await provision(client.jetstream(), Subjects(subject_prefix), Layout())
    try:
        yield client
    finally:
        await client.close()


def consumer(
    nc: Client,
    prefix: str,
    tmp_path: Path,
    execute: RecordingExecutor,
    *,
    fetch_wait_s: float = FETCH_WAIT_S,
) -> CommandConsumer:
    return CommandConsumer(
        nc,
        Subjects(prefix),
        HOST,
        execute,
        Ledger(tmp_path / "ledger"),
        WorkerMetrics(CollectorRegistry()),
        fetch_wait_s=fetch_wait_s,
    )


async def send(nc: Client, prefix: str, command_id: str, instance_id: str) -> None:
    cmd = Stop(id=command_id, instance_id=instance_id, issued_at=now())
    await nc.jetstream().publish(
        Subjects(prefix).command(HOST, cmd.op), encode(cmd), headers={"Nats-Msg-Id": cmd.id}
    )


async def test_one_instance_in_order_several_side_by_side(
    nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    execute = RecordingExecutor(hold_s=0.3)
    for n in range(3):  # queued before the consumer starts: it gets them in one fetch
        await send(nc, subject_prefix, f"a{n}", "inst-a")
        await send(nc, subject_prefix, f"b{n}", "inst-b")
    async with anyio.create_task_group() as tg:
        await tg.start(consumer(nc, subject_prefix, tmp_path, execute).run)
        with anyio.fail_after(60):
            while len(execute.spans) < 6:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()

    for instance in "ab":
        spans = [execute.spans[f"{instance}{n}"] for n in range(3)]
        # In the order sent, each one after the previous one ended.
        assert all(spans[n][1] <= spans[n + 1][0] for n in range(2)), spans
    # The two instances' commands overlapped: at most one per instance at any moment.
    assert execute.most_at_once == 2


async def test_a_command_that_comes_alone_is_taken_at_once(
    nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    """Commands sent one by one to an idle worker each run while its fetch still waits (a
    batch fetch handed a lone command over only at the end of its wait)."""
    execute = RecordingExecutor(hold_s=0.0)
    taker = consumer(nc, subject_prefix, tmp_path, execute, fetch_wait_s=60)
    async with anyio.create_task_group() as tg:
        await tg.start(taker.run)
        for n in range(10):
            await anyio.sleep(0.05 * (n % 4))  # at different points of the fetch
            await send(nc, subject_prefix, f"c{n}", f"inst-{n}")
            with anyio.fail_after(20):  # a third of the fetch's wait
                while f"c{n}" not in execute.spans:
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


async def test_a_stopping_worker_finishes_and_acks_the_command_it_runs(
    nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    subjects = Subjects(subject_prefix)
    execute = RecordingExecutor(hold_s=1.0)
    results = await nc.subscribe(subjects.result("long"), max_msgs=1)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer(nc, subject_prefix, tmp_path, execute).run)
        await send(nc, subject_prefix, "long", "inst-a")
        with anyio.fail_after(30):
            while execute.running == 0:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()  # SIGTERM arrives mid-command

    assert "long" in execute.spans  # it ran to its end
    result = decode_command_result((await results.next_msg(timeout=10)).data)
    assert result.ok and result.command_id == "long"
    info = await nc.jetstream().consumer_info(
        subjects.commands_stream, subjects.command_consumer(HOST)
    )
    assert info.num_pending == 0 and info.num_ack_pending == 0  # acked: not run again


async def test_a_worker_that_cannot_fetch_its_commands_says_so_and_gives_up(
    nats_server: NatsServerProcess, subject_prefix: str, tmp_path: Path
) -> None:
    """NATS gone for longer than the bound: the fetch failures are counted, the heartbeat's
    problem names them, and the consumer ends with one clear error (the daemon exits 1 on
    it, for its supervisor to restart it) instead of retrying silently for ever."""
    nc = await connect(BusOptions(urls=(nats_server.url,)))
    await provision(nc.jetstream(), Subjects(subject_prefix), Layout())
    metrics = WorkerMetrics(CollectorRegistry())
    consumer = CommandConsumer(
        nc,
        Subjects(subject_prefix),
        HOST,
        RecordingExecutor(hold_s=0),
        Ledger(tmp_path / "ledger"),
        metrics,
        fetch_failure_limit_s=3,
    )
    problems: list[str] = []
    try:
        with pytest.raises(ExceptionGroup) as raised:
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                assert consumer.problem() == ""
                nats_server.stop()
                with anyio.fail_after(60):
                    while True:  # the heartbeat's view while it keeps failing
                        problems.append(consumer.problem())
                        await anyio.sleep(0.2)
    finally:
        await close(nc)

    found = raised.value.subgroup(CommandsUnreachable)
    assert found is not None, raised.value
    while isinstance(found, BaseExceptionGroup):
        [found] = found.exceptions
    error = found
    assert f"worker {HOST} could not fetch its commands from NATS" in str(error)
    assert "supervisor restarts it" in str(error)
    assert any(p.startswith("cannot fetch commands from NATS: ") for p in problems), problems
    failures = metrics.registry.get_sample_value("vmfleet_worker_command_fetch_failures_total")
    assert failures is not None and failures >= 1
    assert metrics.registry.get_sample_value("vmfleet_worker_command_fetch_failing") == 1


class CountingExecutor:
    """Counts the runs of each command; each takes ``hold_s`` unless it is to hang."""

    def __init__(self, hold_s: float, hang: anyio.Event | None = None) -> None:
        self.hold_s = hold_s
        self.hang = hang
        self.runs: dict[str, int] = {}

    async def __call__(self, cmd: AnyCommand) -> CommandResult:
        self.runs[cmd.id] = self.runs.get(cmd.id, 0) + 1
        if self.hang is not None:
            await self.hang.wait()
        await anyio.sleep(self.hold_s)
        return CommandResult(command_id=cmd.id, ok=True)


def quick_consumer(
    nc: Client,
    prefix: str,
    ledger: Path,
    execute: CountingExecutor,
    *,
    progress_every_s: float,
    metrics: WorkerMetrics | None = None,
) -> CommandConsumer:
    """A consumer whose ack wait (1 s) is shorter than the commands it runs."""
    return CommandConsumer(
        nc,
        Subjects(prefix),
        HOST,
        execute,
        Ledger(ledger),
        metrics or WorkerMetrics(CollectorRegistry()),
        ack_wait_s=1.0,
        progress_every_s=progress_every_s,
    )


async def test_commands_longer_than_the_ack_wait_run_once(
    nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    """The running command and the one queued behind it (same instance) are both kept
    from redelivery by the in-progress beats: each runs once and is acked."""
    subjects = Subjects(subject_prefix)
    execute = CountingExecutor(hold_s=2.5)
    results = await nc.subscribe(subjects.result("first").replace("first", "*"), max_msgs=2)
    async with anyio.create_task_group() as tg:
        await tg.start(
            quick_consumer(nc, subject_prefix, tmp_path, execute, progress_every_s=0.2).run
        )
        await send(nc, subject_prefix, "first", "inst-a")
        await send(nc, subject_prefix, "second", "inst-a")
        answered = {
            decode_command_result((await results.next_msg(timeout=60)).data).command_id
            for _ in range(2)
        }
        tg.cancel_scope.cancel()

    assert answered == {"first", "second"}
    assert execute.runs == {"first": 1, "second": 1}
    info = await nc.jetstream().consumer_info(
        subjects.commands_stream, subjects.command_consumer(HOST)
    )
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_redelivery_of_a_command_still_running_does_not_run_it_again(
    nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    """Beats too rare for the ack wait (as when the event loop is held up): JetStream
    redelivers the running command to the same worker, which runs it once and acks it."""
    subjects = Subjects(subject_prefix)
    execute = CountingExecutor(hold_s=3.5)
    metrics = WorkerMetrics(CollectorRegistry())
    results = await nc.subscribe(subjects.result("slow"), max_msgs=1)
    async with anyio.create_task_group() as tg:
        await tg.start(
            quick_consumer(
                nc, subject_prefix, tmp_path, execute, progress_every_s=60, metrics=metrics
            ).run
        )
        await send(nc, subject_prefix, "slow", "inst-a")
        result = decode_command_result((await results.next_msg(timeout=60)).data)
        tg.cancel_scope.cancel()

    assert result.ok and execute.runs == {"slow": 1}
    info = await nc.jetstream().consumer_info(
        subjects.commands_stream, subjects.command_consumer(HOST)
    )
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_the_successor_of_a_dead_worker_takes_up_its_command(
    nats_url: str, nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    """A worker that took a command and went silent (its connection gone, no ack, no
    beats): the next worker of the host gets the command after the short ack wait and
    answers it."""
    subjects = Subjects(subject_prefix)
    results = await nc.subscribe(subjects.result("held"), max_msgs=1)
    hang = anyio.Event()
    dead = CountingExecutor(hold_s=0, hang=hang)
    successor = CountingExecutor(hold_s=0)
    first = await nats.connect(nats_url)
    async with anyio.create_task_group() as tg:
        await tg.start(
            quick_consumer(first, subject_prefix, tmp_path / "a", dead, progress_every_s=0.2).run
        )
        await send(nc, subject_prefix, "held", "inst-a")
        with anyio.fail_after(30):
            while not dead.runs:
                await anyio.sleep(0.02)
        await first.close()  # the worker dies holding the command
        second = await nats.connect(nats_url)
        try:
            await tg.start(
                quick_consumer(
                    second, subject_prefix, tmp_path / "b", successor, progress_every_s=0.2
                ).run
            )
            result = decode_command_result((await results.next_msg(timeout=60)).data)
        finally:
            hang.set()
            tg.cancel_scope.cancel()
            await second.close()

    assert result.ok and result.command_id == "held"
    assert successor.runs == {"held": 1}


async def test_an_existing_consumer_gets_the_short_ack_wait(
    nc: Client, subject_prefix: str, tmp_path: Path
) -> None:
    """A consumer made by an older worker (30 s ack wait) is updated in place on start,
    keeping the commands queued on it."""
    subjects = Subjects(subject_prefix)
    durable = subjects.command_consumer(HOST)
    await nc.jetstream().add_consumer(
        subjects.commands_stream,
        config=ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=subjects.command_filter(HOST),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=-1,
        ),
    )
    await send(nc, subject_prefix, "queued", "inst-a")
    execute = CountingExecutor(hold_s=0)
    results = await nc.subscribe(subjects.result("queued"), max_msgs=1)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer_with_defaults(nc, subject_prefix, tmp_path, execute).run)
        result = decode_command_result((await results.next_msg(timeout=60)).data)
        tg.cancel_scope.cancel()

    assert result.ok and execute.runs == {"queued": 1}
    info = await nc.jetstream().consumer_info(subjects.commands_stream, durable)
    assert info.config.ack_wait == ACK_WAIT_S


def consumer_with_defaults(
    nc: Client, prefix: str, tmp_path: Path, execute: CountingExecutor
) -> CommandConsumer:
    return CommandConsumer(
        nc,
        Subjects(prefix),
        HOST,
        execute,
        Ledger(tmp_path / "ledger"),
        WorkerMetrics(CollectorRegistry()),
    )
