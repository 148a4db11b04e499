"""Consuming lifecycle commands: pull, dedupe, dispatch, record, answer, ack.

One durable pull consumer per host reads ``<p>.cmd.<host>.>`` from the work-queue stream.
Commands for one instance (or volume) run one at a time in arrival order; different
instances run concurrently, bounded by a limiter. A command is acked only after its
outcome is in the instance record and the result is published, so a worker killed at any
moment leaves the command in the stream to be redelivered, and redelivery of a command
that did finish is answered from the ledger instead of being run again.

Recovery is fast because the ack wait is short (``ACK_WAIT_S``): a command held by a worker
that died is redelivered a few seconds after its last sign of life, to the worker that
replaced it. A live worker keeps every command it holds (running, or queued behind another
command of its instance or the concurrency limit) from being redelivered by telling
JetStream it is in progress every ``PROGRESS_EVERY_S``. Should that fail for a moment (the
event loop held up for longer than the ack wait), the redelivery comes back to this same
consumer, finds the command's id among those held, and replaces the delivery that is acked
at the end instead of queueing the command a second time: a command never runs twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas.codec import decode_command, encode
from schemas.errors import VmfleetError
from schemas.messages import AnyCommand, CommandResult
from schemas.subjects import Subjects, is_valid_token
from worker.ledger import Ledger
from worker.metrics import WorkerMetrics

__all__ = ["CommandConsumer", "CommandsUnreachable", "Executor"]

log = logging.getLogger(__name__)

#: Runs one command and returns its result (the daemon's dispatcher).
Executor = Callable[[AnyCommand], Awaitable[CommandResult]]

#: How long JetStream waits for a sign of life before it redelivers a command: what a
#: worker's crash costs the commands it held. Applied to an existing consumer on start.
ACK_WAIT_S = 5.0
#: How often each held command is reported in progress: several times per ack wait, so a
#: late beat or two does not lose it.
PROGRESS_EVERY_S = 1.0
#: How long fetching may fail without a break before the worker gives up and exits, so
#: that its supervisor starts a fresh one (a new connection, the consumer made again).
FETCH_FAILURE_LIMIT_S = 120.0
#: How long one fetch waits for a command before it asks again (an empty fetch is no
#: failure); a command that arrives meanwhile is taken at once.
FETCH_WAIT_S = 2.0
#: While fetching fails, how often the log says so again.
_FAILING_LOG_EVERY_S = 30.0


class CommandsUnreachable(Exception):
    """The worker could not fetch its commands for too long; the process should exit."""


class CommandConsumer:
    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        host_id: str,
        execute: Executor,
        ledger: Ledger,
        metrics: WorkerMetrics,
        *,
        concurrency: int = 4,
        fetch_failure_limit_s: float = FETCH_FAILURE_LIMIT_S,
        ack_wait_s: float = ACK_WAIT_S,
        progress_every_s: float = PROGRESS_EVERY_S,
        fetch_wait_s: float = FETCH_WAIT_S,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._host_id = host_id
        self._execute = execute
        self._ledger = ledger
        self._metrics = metrics
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._queues: dict[str, MemoryObjectSendStream[AnyCommand]] = {}
        #: command id → its latest delivery, from its arrival until it is answered.
        self._held: dict[str, Msg] = {}
        self._ack_wait_s = ack_wait_s
        self._progress_every_s = progress_every_s
        self._fetch_wait_s = fetch_wait_s
        self._fetch_failure_limit_s = fetch_failure_limit_s
        #: Since when fetching has failed without a break (None: it works).
        self._failing_since: float | None = None
        self._failing_logged_at = 0.0
        self._last_fetch_error = ""

    def problem(self) -> str:
        """What is wrong with taking commands, for the heartbeat ("" when nothing is)."""
        if self._failing_since is None:
            return ""
        return f"cannot fetch commands from NATS: {self._last_fetch_error}"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        js = self._nc.jetstream()
        durable = self._subjects.command_consumer(self._host_id)
        stream = self._subjects.commands_stream
        # Created, or updated in place when it exists (the ack wait of a consumer made by an
        # older worker): pull_subscribe alone would take an existing consumer as it is.
        await js.add_consumer(
            stream,
            config=ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=self._subjects.command_filter(self._host_id),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._ack_wait_s,
                max_ack_pending=1000,
                max_deliver=-1,
            ),
        )
        subscription = await js.pull_subscribe_bind(durable, stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_held_in_progress)
            task_status.started()
            while True:
                try:
                    # One at a time: a batch fetch returns when its batch is full or its
                    # wait is over, so a command that came alone waited for the rest of
                    # the wait (seen: 0.2-1.7 s before a create began). Each command is
                    # run as a task of its own, so one pull request per command is all
                    # that taking them singly costs.
                    messages = await subscription.fetch(batch=1, timeout=self._fetch_wait_s)
                except TimeoutError as exc:
                    # An empty fetch. nats-py raises its own TimeoutError (a subclass) or,
                    # now and then, asyncio's; either must not read as a failure, unless
                    # there is no connection to fetch over.
                    if self._nc.is_connected:
                        self._fetched()
                    else:
                        self._fetch_failed(exc)
                    continue
                except Exception as exc:  # NATS reconnecting: the consumer is durable, wait
                    self._fetch_failed(exc)
                    await anyio.sleep(1)
                    continue
                self._fetched()
                for msg in messages:
                    await self._dispatch(tg, msg)

    def _fetched(self) -> None:
        if self._failing_since is not None:
            log.warning("fetching commands works again")
            self._failing_since = None
            self._metrics.command_fetch_failing.set(0)

    def _fetch_failed(self, exc: Exception) -> None:
        """Count and report a failed fetch; raise once fetching failed for too long."""
        now = anyio.current_time()
        self._metrics.command_fetch_failures.inc()
        self._metrics.command_fetch_failing.set(1)
        self._last_fetch_error = str(exc) or type(exc).__name__
        if self._failing_since is None:
            self._failing_since = now
        failing_for = now - self._failing_since
        if failing_for >= self._fetch_failure_limit_s:
            raise CommandsUnreachable(
                f"worker {self._host_id} could not fetch its commands from NATS for "
                f"{failing_for:.0f}s (last error: {self._last_fetch_error}); exiting so that "
                "its supervisor restarts it"
            )
        if failing_for == 0 or now - self._failing_logged_at >= _FAILING_LOG_EVERY_S:
            self._failing_logged_at = now
            log.warning(
                "fetching commands has failed for %.0fs: %s (the worker exits after %.0fs)",
                failing_for,
                self._last_fetch_error,
                self._fetch_failure_limit_s,
            )

    async def _dispatch(self, tg: TaskGroup, msg: Msg) -> None:
        try:
            cmd = decode_command(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await self._reject(msg, str(exc))
            return
        if cmd.id in self._held:
            # Redelivered while this worker still holds it (beats came late): the newest
            # delivery is the one to keep alive and ack; the command runs once.
            self._held[cmd.id] = msg
            self._metrics.command_redeliveries_held.inc()
            return
        self._held[cmd.id] = msg
        key = getattr(cmd, "instance_id", None) or getattr(cmd, "volume_id", None) or cmd.id
        queue = self._queues.get(key)
        if queue is None:
            send, receive = anyio.create_memory_object_stream[AnyCommand](math.inf)
            self._queues[key] = queue = send
            tg.start_soon(self._drain, key, receive)
        queue.send_nowait(cmd)

    async def _keep_held_in_progress(self) -> None:
        """Every held command, queued or running, is kept from redelivery while this worker
        lives; when it dies the beats stop and the ack wait hands them to its successor."""
        while True:
            await anyio.sleep(self._progress_every_s)
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # NATS away: redelivery comes back here, held
                    log.debug("in_progress failed: %s", exc)

    async def _drain(self, key: str, receive: MemoryObjectReceiveStream[AnyCommand]) -> None:
        """Run one key's commands in order; the queue goes away when it is empty."""
        async with receive:
            while True:
                try:
                    cmd = receive.receive_nowait()
                except anyio.WouldBlock:
                    # Nothing awaits between this check and the removal: no command can
                    # slip into a queue that is about to disappear.
                    del self._queues[key]
                    return
                # Shielded: a worker asked to stop finishes the command it is running
                # (every operation bounds its own waits) instead of abandoning it half-way.
                async with self._limiter:
                    with anyio.CancelScope(shield=True):
                        await self._handle(cmd)

    async def _handle(self, cmd: AnyCommand) -> None:
        result = self._ledger.get(cmd.id)
        if result is None:
            with self._metrics.op_duration.labels(op=cmd.op).time():
                result = await self._execute(cmd)
            self._ledger.put(result)
        outcome = "ok" if result.ok else (result.error.code if result.error else "error")
        self._metrics.commands.labels(op=cmd.op, outcome=outcome).inc()
        await self._answer(self._held.pop(cmd.id), result)

    async def _answer(self, msg: Msg, result: CommandResult) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._nc.publish(self._subjects.result(result.command_id), encode(result))
                await msg.ack()
            except Exception as exc:  # not acked: redelivered, and answered from the ledger
                log.warning("could not answer command %s: %s", result.command_id, exc)

    async def _reject(self, msg: Msg, reason: str) -> None:
        """A command that does not decode is answered and acked: retrying cannot fix it."""
        command_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        log.warning("rejected malformed command %r: %s", command_id, reason)
        self._metrics.commands.labels(op="invalid", outcome="bad_request").inc()
        error = VmfleetError(f"malformed command: {reason}", code="bad_request")
        error.status = 400
        if command_id and is_valid_token(command_id):
            await self._answer(
                msg, CommandResult(command_id=command_id, ok=False, error=error.info())
            )
        else:
            await msg.ack()
