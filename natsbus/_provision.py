"""Creating the streams and buckets of vmfleet's NATS layout, idempotently.

Every component calls :func:`provision` at start-up, so the order in which gateways and
workers come up does not matter. Each object is looked up first and left alone when it
already has this version's settings; a missing one is created, and one with other
settings (a changed limit or replica count) is updated in place.

Only a gateway's NATS user may create or update streams when permissions are in force
(docs/security.md); a worker only looks them up. A worker that finds an object missing
waits for a gateway to create it, and one that finds it different carries on with it as
it is. A request NATS does not permit gets no answer, so both show up as timeouts here.

A lookup that gets no answer, or JetStream's "temporarily unavailable", is asked again: a
cluster whose meta leader is being elected, or is busy placing the streams just created
(with three replicas each), drops requests for some seconds. Start-up waits through that
instead of failing on the first such request.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import anyio
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from schemas.subjects import Subjects

__all__ = ["Layout", "provision"]

log = logging.getLogger(__name__)

DAY_S = 86_400.0
#: How often a component that may not create a missing object looks for it again.
_WAIT_FOR_CREATOR_S = 1.0
#: How long after a lookup that got no answer it is asked again.
_RETRY_LOOKUP_S = 0.5


@dataclass(frozen=True)
class Layout:
    """Sizes and durabilities of the NATS objects; defaults suit one dev host."""

    replicas: int = 1
    #: A retried command with the same idempotency key inside this window is dropped by NATS.
    command_dedupe_window_s: float = 600.0
    #: A dead host's record vanishes this long after its last heartbeat.
    host_ttl_s: float = 15.0
    state_events_max_age_s: float = 7 * DAY_S
    logs_max_age_s: float = 7 * DAY_S
    logs_max_bytes: int = 1 << 30
    logs_max_msgs_per_subject: int = 200_000
    #: An uploaded volume archive not picked up by a worker within this time is dropped.
    archive_ttl_s: float = 3600.0
    #: One log line message may be at most this big; longer lines are split by the worker.
    max_log_line_bytes: int = 64 * 1024
    #: A bundle in the transfers object store (a snapshot fetched by other hosts, an
    #: instance being moved) is dropped this long after it was written.
    transfer_ttl_s: float = DAY_S


@dataclass(frozen=True)
class _Wanted:
    """One object of the layout: its stream, the stream settings this version wants, and
    how to create it (streams, KV buckets and object stores are created differently)."""

    stream: str
    settings: dict[str, object]
    create: Callable[[], Awaitable[object]]


async def provision(js: JetStreamContext, subjects: Subjects, layout: Layout) -> None:
    """Create (or update) every stream, KV bucket and object store vmfleet uses."""
    for wanted in _layout(js, subjects, layout):
        await _ensure(js, wanted)


def _layout(js: JetStreamContext, s: Subjects, layout: Layout) -> list[_Wanted]:
    wanted = [
        _Wanted(
            config.name or "", _stream_settings(config), functools.partial(js.add_stream, config)
        )
        for config in _streams(s, layout)
    ]
    for kv in _buckets(s, layout):
        settings: dict[str, object] = {
            "description": kv.description,
            "max_msgs_per_subject": kv.history,
            "max_age": kv.ttl,
            "storage": kv.storage,
            "num_replicas": kv.replicas,
        }
        wanted.append(
            _Wanted(f"KV_{kv.bucket}", settings, functools.partial(js.create_key_value, kv))
        )
    archives = ObjectStoreConfig(
        bucket=s.archives_bucket,
        description="volume archives in transit to a worker",
        ttl=layout.archive_ttl_s,
        storage=StorageType.FILE,
        replicas=layout.replicas,
    )
    settings = {
        "description": archives.description,
        "max_age": archives.ttl,
        "storage": archives.storage,
        "num_replicas": archives.replicas,
    }

    create = functools.partial(js.create_object_store, s.archives_bucket, config=archives)
    wanted.append(_Wanted(f"OBJ_{s.archives_bucket}", settings, create))
    wanted.append(_transfers(js, s, layout))
    return wanted


def _transfers(js: JetStreamContext, s: Subjects, layout: Layout) -> _Wanted:
    """Snapshots and moved instances in transit between hosts (worker.transfer). No
    max_bytes: a limit is a reservation on every server of the cluster; what is left
    behind by a broken move ages out instead."""
    transfers = ObjectStoreConfig(
        bucket=s.transfers_bucket,
        description="snapshots and moved instances in transit between hosts",
        ttl=layout.transfer_ttl_s,
        storage=StorageType.FILE,
        replicas=layout.replicas,
    )
    settings: dict[str, object] = {
        "description": transfers.description,
        "max_age": transfers.ttl,
        "storage": transfers.storage,
        "num_replicas": transfers.replicas,
    }
    create = functools.partial(js.create_object_store, s.transfers_bucket, config=transfers)
    return _Wanted(f"OBJ_{s.transfers_bucket}", settings, create)


def _streams(s: Subjects, layout: Layout) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=s.commands_stream,
            description="lifecycle commands, one durable consumer per host",
            subjects=[s.commands_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=layout.replicas,
            duplicate_window=layout.command_dedupe_window_s,
        ),
        StreamConfig(
            name=s.states_stream,
            description="instance state transitions",
            subjects=[s.states_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=layout.replicas,
            max_age=layout.state_events_max_age_s,
        ),
        StreamConfig(
            name=s.logs_stream,
            description="instance log lines, one subject per instance and source",
            subjects=[s.logs_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=layout.replicas,
            max_age=layout.logs_max_age_s,
            max_bytes=layout.logs_max_bytes,
            max_msgs_per_subject=layout.logs_max_msgs_per_subject,
            max_msg_size=layout.max_log_line_bytes + 4096,
            discard=DiscardPolicy.OLD,
        ),
    ]


def _buckets(s: Subjects, layout: Layout) -> list[KeyValueConfig]:
    def bucket(name: str, description: str, ttl: float | None = None) -> KeyValueConfig:
        return KeyValueConfig(
            bucket=name,
            description=description,
            history=1,
            ttl=ttl,
            storage=StorageType.FILE,
            replicas=layout.replicas,
        )

    return [
        bucket(s.instances_bucket, "instance records, written only by the owning worker"),
        bucket(s.hosts_bucket, "host heartbeats and capacity", ttl=layout.host_ttl_s),
        bucket(s.volumes_bucket, "volume records, written only by the owning worker"),
        bucket(s.snapshots_bucket, "snapshot records, written by the hosts holding them"),
        bucket(s.images_bucket, "image pull status per host"),
        bucket(s.drains_bucket, "hosts drained by an operator: no new placements"),
        bucket(s.names_bucket, "instance names, claimed by a gateway's create until delete"),
    ]


def _stream_settings(config: StreamConfig) -> dict[str, object]:
    """The settings a stream config sets; the others are left to the server's defaults."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name != "name" and getattr(config, f.name) not in (None, f.default)
    }


async def _ensure(js: JetStreamContext, wanted: _Wanted) -> None:
    told = False
    while True:
        existing = await _answered_lookup(js, wanted.stream)
        if existing is not None:
            await _reconcile(js, wanted, existing)
            return
        try:
            await wanted.create()
            log.info("created stream %s", wanted.stream)
            return
        except BadRequestError as exc:
            # Created meanwhile by another component, with other settings: reconcile.
            log.info("creating stream %s: %s", wanted.stream, exc.description)
        except NatsTimeoutError:
            if not told:
                log.warning(
                    "stream %s does not exist and creating it got no answer; waiting for it "
                    "(if this component's NATS user may not create streams, a gateway does)",
                    wanted.stream,
                )
                told = True
            await anyio.sleep(_WAIT_FOR_CREATOR_S)


async def _answered_lookup(js: JetStreamContext, stream: str) -> StreamConfig | None:
    """The stream's config (None: it does not exist), asked until JetStream answers."""
    told = False
    while True:
        try:
            return await _current(js, stream)
        except (NatsTimeoutError, ServiceUnavailableError) as exc:
            if not told:
                told = True
                log.warning(
                    "looking up stream %s: JetStream did not answer (%s); asking again until "
                    "it does (a cluster electing its leaders answers after a few seconds)",
                    stream,
                    type(exc).__name__,
                )
        await anyio.sleep(_RETRY_LOOKUP_S)


async def _current(js: JetStreamContext, stream: str) -> StreamConfig | None:
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return None
    return info.config


async def _reconcile(js: JetStreamContext, wanted: _Wanted, existing: StreamConfig) -> None:
    changed = {
        name: value
        for name, value in wanted.settings.items()
        if value is not None and not _same(getattr(existing, name, None), value)
    }
    if not changed:
        return
    # "stream name already in use with a different configuration": update it instead,
    # which is how a changed replica count or limit reaches a running cluster.
    log.info("updating stream %s: %s", wanted.stream, ", ".join(sorted(changed)))
    try:
        await js.update_stream(dataclasses.replace(existing, **changed))  # type: ignore[arg-type]
    except NatsTimeoutError:
        log.warning(
            "stream %s differs from this version's layout (%s) but updating it got no answer "
            "(this component's NATS user may not update streams; a gateway does); using it "
            "as it is",
            wanted.stream,
            ", ".join(sorted(changed)),
        )


def _same(current: object, wanted: object) -> bool:
    """Equal as settings: enums by value, durations within a microsecond, 0 as unset."""
    if isinstance(current, Enum):
        current = current.value
    if isinstance(wanted, Enum):
        wanted = wanted.value
    if current is None:
        current = 0 if isinstance(wanted, int | float) else current
    if isinstance(current, int | float) and isinstance(wanted, int | float):
        return abs(current - wanted) < 1e-6
    return current == wanted
