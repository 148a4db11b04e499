"""What each NATS user of a fleet may publish and subscribe to: a gateway, and one worker
per host.

The lists are derived from ``schemas.subjects`` and from what the components really send
(docs/security.md has the table and the reasons). NATS checks permissions on *subjects*,
so a rule can only be as narrow as the subject is:

- restricted to the worker's own host: pulling and acking commands (only its durable
  consumer ``worker_<host>``, created only with the filter ``<p>.cmd.<host>.>``), host
  queries (``<p>.host.<host>.*``, session opens and stat included), guest sessions
  (``<p>.sess.<host>.*.in|out``: a worker reads and answers only its own host's
  sessions), state transitions (``<p>.state.<host>.*``), its heartbeat
  (``$KV.<p>_hosts.<host>``), and replies (only on its own inbox prefix);
- not restrictable by host, because the subject carries no host: instance, volume and
  image records (keyed by instance id, volume id, image name), log lines
  (``<p>.logs.<instance>.<source>``), command results (``<p>.result.<command id>``),
  volume archives in transit (object names are upload ids) and bundles moving between
  hosts (the transfers object store: any host may upload a snapshot another fetches).

Wildcard subject patterns are formatted here, next to the names ``Subjects`` builds;
the tests check every pattern against the subjects the components really use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from schemas.subjects import Subjects

__all__ = [
    "FleetUser",
    "Permissions",
    "fleet_users",
    "gateway_permissions",
    "inbox_prefix",
    "worker_permissions",
]

_API: Final = "$JS.API"

Role = Literal["gateway", "worker"]


@dataclass(frozen=True)
class Permissions:
    """Allowed subjects (patterns). Everything else is denied by nats-server."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: May answer requests it received (core request/reply), once each.
    allow_responses: bool = False


@dataclass(frozen=True)
class FleetUser:
    """One NATS user of the fleet and what it may do."""

    name: str
    role: Role
    host: str | None
    permissions: Permissions


def inbox_prefix(subjects: Subjects, host: str | None = None) -> str:
    """The reply-inbox prefix of a gateway (``host`` None) or of the worker on ``host``.

    Each user may only subscribe below its own prefix, so no worker can read replies meant
    for another component, such as the commands JetStream delivers to another host's
    pull requests. ``vmfleet gateway`` and ``vmfleet worker`` set it themselves.
    """
    if host is None:
        return f"_INBOX.{subjects.prefix}.gateway"
    subjects.command_consumer(host)  # validates the host id
    return f"_INBOX.{subjects.prefix}.worker.{host}"


def _streams(s: Subjects) -> dict[str, str]:
    """Every JetStream stream of the fleet, by role (KV buckets and the object store are
    streams too, named by the nats client's convention ``KV_<bucket>`` / ``OBJ_<bucket>``)."""
    return {
        "commands": s.commands_stream,
        "states": s.states_stream,
        "logs": s.logs_stream,
        "instances": f"KV_{s.instances_bucket}",
        "hosts": f"KV_{s.hosts_bucket}",
        "volumes": f"KV_{s.volumes_bucket}",
        "snapshots": f"KV_{s.snapshots_bucket}",
        "images": f"KV_{s.images_bucket}",
        "drains": f"KV_{s.drains_bucket}",
        "names": f"KV_{s.names_bucket}",
        "archives": f"OBJ_{s.archives_bucket}",
        "transfers": f"OBJ_{s.transfers_bucket}",
    }


def _read(stream: str) -> list[str]:
    """Reading a stream: direct and API gets, and consumers (ordered ones included, with
    their flow-control replies)."""
    return [
        f"{_API}.STREAM.MSG.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.*",
        f"{_API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def gateway_permissions(subjects: Subjects) -> Permissions:
    """A gateway: provisions the layout, sends commands to any host, asks any host, reads
    every record, stream and log, writes drains and image requests, uploads archives."""
    s = subjects
    p = s.prefix
    streams = _streams(s)
    publish = [
        s.commands_all,  # lifecycle commands to any host
        f"{p}.host.*.*",  # host queries to any host (session opens and stat too)
        s.session_filter(None, "in"),  # frames of guest sessions towards any host
        f"$KV.{s.drains_bucket}.>",
        f"$KV.{s.images_bucket}.>",  # a pull request creates the image record
        f"$KV.{s.names_bucket}.>",  # a create claims its name, a delete releases it
        f"$O.{s.archives_bucket}.>",  # volume archive uploads
        f"{_API}.INFO",
        f"{_API}.STREAM.NAMES",
        f"{_API}.STREAM.PURGE.{streams['archives']}",  # deleting an unused upload
    ]
    for stream in streams.values():
        publish += [
            f"{_API}.STREAM.CREATE.{stream}",
            f"{_API}.STREAM.UPDATE.{stream}",
            f"{_API}.STREAM.INFO.{stream}",
        ]
    for role, stream in streams.items():
        if role != "commands":  # the gateway never reads a host's queue
            publish += _read(stream)
    subscribe = [f"{p}.result.*", s.session_filter(None, "out"), f"{inbox_prefix(s)}.>"]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def worker_permissions(subjects: Subjects, host: str) -> Permissions:
    """The worker on ``host``: its own command consumer, queries, transitions and
    heartbeat; records, logs and results it cannot be confined to (see the module doc)."""
    s = subjects
    streams = _streams(s)
    commands = streams["commands"]
    durable = s.command_consumer(host)
    publish = [
        # -- restricted to this host ------------------------------------------------------
        f"{_API}.CONSUMER.INFO.{commands}.{durable}",
        # The filter is part of the subject (nats-server 2.9+), so the consumer cannot be
        # created or changed to read another host's commands.
        f"{_API}.CONSUMER.CREATE.{commands}.{durable}.{s.command_filter(host)}",
        f"{_API}.CONSUMER.MSG.NEXT.{commands}.{durable}",
        f"$JS.ACK.{commands}.{durable}.>",
        s.state_filter(host),
        s.session_filter(host, "out"),  # frames of its own guest sessions only
        f"$KV.{s.hosts_bucket}.{host}",
        # -- not restrictable by host: the subject names no host --------------------------
        f"$KV.{s.instances_bucket}.>",
        f"$KV.{s.volumes_bucket}.>",
        f"$KV.{s.snapshots_bucket}.>",  # the records of the snapshots a host holds
        f"$KV.{s.images_bucket}.>",
        s.logs_filter(),
        f"{s.prefix}.result.*",
        # volume archives: read one, then delete it (meta marker and purge of its chunks)
        f"$O.{s.archives_bucket}.M.>",
        f"{_API}.STREAM.PURGE.{streams['archives']}",
        # snapshots and moved instances between hosts: upload (chunks, then the meta
        # message), fetch, and delete what was moved (worker.transfer)
        f"$O.{s.transfers_bucket}.>",
        f"{_API}.STREAM.PURGE.{streams['transfers']}",
    ]
    # Reading: an archive; image records (updated on the revision read); instance and
    # volume records, whole buckets, since at start a worker looks for records of its
    # own that no longer exist on disk, and keys do not say which host a record is of.
    for role in ("archives", "transfers", "images", "instances", "volumes", "snapshots"):
        publish += _read(streams[role])
    # Looking streams up (start-up checks, opening a bucket, the object store finding its
    # stream by subject); creating them is a gateway's.
    publish += [f"{_API}.STREAM.NAMES"]
    publish += [f"{_API}.STREAM.INFO.{stream}" for stream in streams.values()]
    subscribe = [
        s.host_query_filter(host),
        s.session_filter(host, "in"),
        f"{inbox_prefix(s, host)}.>",
    ]
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe), allow_responses=True)


def fleet_users(subjects: Subjects, hosts: tuple[str, ...]) -> list[FleetUser]:
    """The gateway user (shared by every replica) and one worker user per host."""
    if len(set(hosts)) != len(hosts):
        raise ValueError("host ids must be unique")
    users = [
        FleetUser(f"{subjects.prefix}-gateway", "gateway", None, gateway_permissions(subjects))
    ]
    users += [
        FleetUser(
            f"{subjects.prefix}-worker-{host}", "worker", host, worker_permissions(subjects, host)
        )
        for host in hosts
    ]
    return users
