"""The gateway's in-memory copy of the fleet: instances, volumes, images and live hosts.

Every GET and list is answered from here, without a round trip to a worker (the KV
buckets are the fleet's view; workers are their only writers, except image records,
see ``docs/api.md``). One KV watcher per bucket keeps the copy current: puts replace an
entry, deletes and purges remove it. A value that does not decode (written by a newer
or broken writer) is logged and left out, never served half-understood.

Hosts are special: their bucket has a TTL, and JetStream drops an aged-out heartbeat
without telling watchers. So each host carries its own expiry (the heartbeat's server
time plus the TTL) and :meth:`FleetView.live_hosts` leaves out, and forgets, expired ones.

Waiting for a change (read-your-writes after a command, ``/wait``, the end of a log
follow) uses one :class:`anyio.Event` that is swapped on every change, so waiters are
woken by updates, never by polling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from natsbus.backoff import Backoff
from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.codec import (
    decode_drain_record,
    decode_host_record,
    decode_image_record,
    decode_instance_record,
    decode_volume_record,
    encode,
)
from schemas.messages import DrainRecord, HostRecord, ImageRecord, InstanceRecord, VolumeRecord
from schemas.subjects import Subjects

__all__ = ["FleetView"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_DELETES = frozenset({"DEL", "PURGE"})
#: Pauses between attempts to watch the buckets again after a NATS error.
_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 5.0


class FleetView:
    """A watched copy of the four buckets. Start :meth:`run` in a task group; read the
    dictionaries directly (they are replaced entry by entry, never mutated in place)."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        *,
        host_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._host_ttl_s = host_ttl_s
        self._clock = clock
        self.instances: dict[str, InstanceRecord] = {}
        self.volumes: dict[str, VolumeRecord] = {}
        self.images: dict[str, ImageRecord] = {}
        self.drains: dict[str, DrainRecord] = {}
        self._hosts: dict[str, tuple[HostRecord, float]] = {}
        self._names: dict[str, set[str]] = {}
        self._rendered: dict[str, tuple[bool, bytes]] = {}
        self._changed = anyio.Event()
        self._resync = anyio.Event()
        self._last_host_entry = clock()

    # -- reading -------------------------------------------------------------------------------

    def instance_json(self, instance_id: str) -> bytes:
        """The instance's API JSON, rendered once per version of its record and liveness of
        its host (a list of 10,000 instances is then a join, not 10,000 renderings)."""
        record = self.instances[instance_id]
        reachable = self.host_alive(record.host)
        cached = self._rendered.get(instance_id)
        if cached is None or cached[0] != reachable:
            shown = record if reachable else _unreachable(record)
            cached = self._rendered[instance_id] = (reachable, encode(shown.to_api()))
        return cached[1]

    def effective_state(self, instance_id: str) -> InstanceState:
        """The state a client sees: ``Unknown`` while the owning host is unreachable."""
        record = self.instances[instance_id]
        return record.state if self.host_alive(record.host) else InstanceState.UNKNOWN

    def matching(self, state: str | None = None, tags: dict[str, str] | None = None) -> list[str]:
        """Ids, in order, of the instances in ``state`` (as clients see it) whose tags
        include every pair of ``tags``: one pass over the copy, no round trip."""
        instances = self.instances
        return [
            key
            for key in sorted(instances)
            if (not tags or instances[key].has_tags(tags))
            and (state is None or self.effective_state(key).value == state)
        ]

    def host_alive(self, host_id: str) -> bool:
        """Whether the host's heartbeat is younger than the TTL (one dictionary lookup)."""
        beat = self._hosts.get(host_id)
        return beat is not None and beat[1] > self._clock()

    def instance_ids_named(self, name: str) -> set[str]:
        """Ids of the instances called ``name`` (several when names are reused)."""
        return self._names.get(name, set())

    def live_hosts(self) -> list[HostRecord]:
        """Hosts whose last heartbeat is younger than the TTL, by id; forgets the others."""
        now = self._clock()
        for host_id in [h for h, (_, expires) in self._hosts.items() if expires <= now]:
            del self._hosts[host_id]
        return [record for _, (record, _) in sorted(self._hosts.items())]

    def live_host(self, host_id: str) -> HostRecord | None:
        """The host's record if its heartbeat is younger than the TTL (one lookup)."""
        beat = self._hosts.get(host_id)
        return beat[0] if beat is not None and beat[1] > self._clock() else None

    async def wait_until(self, probe: Callable[[], T | None], timeout_s: float) -> T | None:
        """``probe()`` once it returns something truthy, or its last answer at the deadline.

        Re-evaluated after every change of the view, not on a timer.
        """
        with anyio.move_on_after(timeout_s):
            while not (found := probe()):
                await self._changed.wait()
            return found
        return probe()

    # -- watching ------------------------------------------------------------------------------

    def resync(self) -> None:
        """Watch every bucket afresh: called when the NATS connection came back (perhaps to
        another server of the cluster), where a watcher's consumer may have been lost."""
        self._resync.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch every bucket until cancelled; started once each one's current content is in.
        After :meth:`resync`, the watchers are started again and replay the buckets.

        Once started, a NATS error while watching (a server leaving the cluster, a stream
        leader being elected) never ends the view: the watchers are started again after a
        short pause, and the copy serves what it last knew meanwhile. Only the first start
        fails outright, so that a gateway that cannot see the fleet does not come up.
        """
        backoff = Backoff(first_s=_RETRY_MIN_S, max_s=_RETRY_MAX_S)
        while True:
            try:
                async with anyio.create_task_group() as tg:
                    await self._start_watchers(tg)
                    tg.start_soon(self._resync_when_heartbeats_stall)
                    task_status.started()
                    task_status = anyio.TASK_STATUS_IGNORED
                    backoff.reset()
                    await self._resync.wait()
                    log.info("re-watching the fleet's buckets after a reconnect")
                    tg.cancel_scope.cancel()
            except Exception as exc:
                if task_status is not anyio.TASK_STATUS_IGNORED:
                    raise
                log.warning(
                    "watching the fleet's buckets failed (%r); again in %.1fs", exc, backoff.delay
                )
                await backoff.sleep()
            self._resync = anyio.Event()

    async def _resync_when_heartbeats_stall(self) -> None:
        """Hosts beat every few seconds. If none has been seen for two thirds of the TTL
        while hosts are known, the watchers' consumers are presumably lost (their server
        left the cluster without this client noticing): watch again before hosts expire."""
        stall = self._host_ttl_s * 2 / 3
        while True:
            await anyio.sleep(min(2.0, stall / 2))
            if self._hosts and self._clock() - self._last_host_entry > stall:
                log.warning("no heartbeat for %.0fs: watching the buckets again", stall)
                self._last_host_entry = self._clock()
                self.resync()

    async def _start_watchers(self, tg: anyio.abc.TaskGroup) -> None:
        s = self._subjects
        await tg.start(self._watch, s.instances_bucket, self._apply_instance)
        await tg.start(self._watch, s.volumes_bucket, self._apply_volume)
        await tg.start(self._watch, s.images_bucket, self._apply_image)
        await tg.start(self._watch, s.hosts_bucket, self._apply_host)
        await tg.start(self._watch, s.drains_bucket, self._apply_drain)

    async def _watch(
        self,
        bucket: str,
        apply: Callable[[KeyValue.Entry], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        kv = await self._js.key_value(bucket)
        watcher = await kv.watchall()
        started = False
        try:
            async for entry in watcher:
                if entry is None:  # the watcher's "initial values delivered" marker
                    if not started:
                        started = True
                        task_status.started()
                    continue
                apply(entry)
                self._notify()
        finally:
            with anyio.CancelScope(shield=True):
                await watcher.stop()  # type: ignore[no-untyped-call]
        raise RuntimeError(f"the watcher of KV bucket {bucket} stopped")

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _apply_instance(self, entry: KeyValue.Entry) -> None:
        self._rendered.pop(entry.key, None)
        old = self.instances.pop(entry.key, None)
        if old is not None:
            self._names.get(old.name, set()).discard(entry.key)
            if not self._names.get(old.name):
                self._names.pop(old.name, None)
        record = _decoded(entry, decode_instance_record)
        if record is not None:
            self.instances[entry.key] = record
            self._names.setdefault(record.name, set()).add(entry.key)

    def _apply_volume(self, entry: KeyValue.Entry) -> None:
        record = _decoded(entry, decode_volume_record)
        if record is None:
            self.volumes.pop(entry.key, None)
        else:
            self.volumes[entry.key] = record

    def _apply_image(self, entry: KeyValue.Entry) -> None:
        record = _decoded(entry, decode_image_record)
        if record is None:
            self.images.pop(entry.key, None)
        else:
            self.images[entry.key] = record

    def _apply_drain(self, entry: KeyValue.Entry) -> None:
        record = _decoded(entry, decode_drain_record)
        if record is None:
            self.drains.pop(entry.key, None)
        else:
            self.drains[entry.key] = record

    def _apply_host(self, entry: KeyValue.Entry) -> None:
        self._last_host_entry = self._clock()
        record = _decoded(entry, decode_host_record)
        if record is None:
            self._hosts.pop(entry.key, None)
            return
        written = entry.created if isinstance(entry.created, datetime) else utc_now()
        age = max(0.0, (utc_now() - written).total_seconds())
        self._hosts[entry.key] = (record, self._clock() + self._host_ttl_s - age)


def _unreachable(record: InstanceRecord) -> InstanceRecord:
    """The record as the fleet can vouch for it while its host is silent: nothing is
    deleted, and the true state comes back with the host's next heartbeat."""
    return msgspec.structs.replace(
        record,
        state=InstanceState.UNKNOWN,
        state_error=f"host {record.host} is unreachable (no heartbeat); last known state "
        f"{record.state.value}",
    )


def _decoded(entry: KeyValue.Entry, decode: Callable[[bytes], T]) -> T | None:
    """The entry's value, or None for a delete, a purge, or a value that does not decode."""
    if entry.operation in _DELETES or not entry.value:
        return None
    try:
        return decode(entry.value)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.warning("ignoring undecodable %s entry %r: %s", entry.bucket, entry.key, exc)
        return None
