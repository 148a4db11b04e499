"""Creating the streams and buckets of vmfleet's NATS layout, idempotently.

Every component calls :func:`provision` at start-up, so the order in which gateways and
workers come up does not matter. Creating an object that exists with the same config is a
no-op in JetStream; one that exists with another config is updated where JetStream allows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from schemas.subjects import Subjects

__all__ = ["Layout", "provision"]

log = logging.getLogger(__name__)

DAY_S = 86_400.0


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


async def provision(js: JetStreamContext, subjects: Subjects, layout: Layout) -> None:
    """Create (or update) every stream and KV bucket vmfleet uses."""
    for config in _streams(subjects, layout):
        await _ensure_stream(js, config)
    for kv in _buckets(subjects, layout):
        await js.create_key_value(kv)
    await js.create_object_store(
        subjects.archives_bucket,
        config=ObjectStoreConfig(
            bucket=subjects.archives_bucket,
            description="volume archives in transit to a worker",
            ttl=layout.archive_ttl_s,
            storage=StorageType.FILE,
            replicas=layout.replicas,
        ),
    )


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
        bucket(s.images_bucket, "image pull status per host"),
        bucket(s.drains_bucket, "hosts drained by an operator: no new placements"),
    ]


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # "stream name already in use with a different configuration": update it instead,
        # which is how a changed replica count or limit reaches a running cluster.
        log.info("updating stream %s: %s", config.name, exc.description)
        await js.update_stream(config)
