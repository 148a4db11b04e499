"""Every NATS subject, stream, consumer and KV bucket name vmfleet uses, in one place.

Why one module: gateway and worker must agree on names byte for byte, and tests run several
fleets side by side on one nats-server by giving each its own prefix. Nothing else in the code
base should format a subject string.

Layout (prefix ``p``, default ``vmfleet``; ``P`` is its upper-case form):

=====================  =========================================  ============================
what                   subjects / name                            kind
=====================  =========================================  ============================
lifecycle commands     ``p.cmd.<host>.<op>``                      stream ``P_COMMANDS``
command results        ``p.result.<command id>``                  core NATS (gateway awaits)
state transitions      ``p.state.<host>.<instance>``              stream ``P_STATES``
log lines              ``p.logs.<instance>.<app|vmm|ops>``        stream ``P_LOGS``
host-local queries     ``p.host.<host>.<method>``                 core request/reply
guest sessions         ``p.sess.<host>.<session>.in|out``         core NATS (schemas.sessions)
instance records       key = instance id                          KV ``p_instances``
host heartbeats        key = host id                              KV ``p_hosts``
volumes / images       key = volume id / image digest or name     KV ``p_volumes``/``p_images``
files between hosts    objects ``<bundle>/...``                   object store ``p_transfers``
=====================  =========================================  ============================

Host ids, instance ids, ops, methods and command ids each fill exactly one subject token, so
they are validated (``is_valid_token``) and a bad one raises ValueError instead of silently
publishing to the wrong subject (an id containing ``.`` would add a level; ``*``/``>`` would
turn a publish subject into a wildcard).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

__all__ = [
    "DEFAULT_PREFIX",
    "LOG_SOURCES",
    "LogSource",
    "Subjects",
    "image_key",
    "is_valid_prefix",
    "is_valid_token",
]

DEFAULT_PREFIX: Final = "vmfleet"

LogSource = Literal["app", "vmm", "ops"]
"""Log streams per instance: guest serial console, VMM process output, vmfleet's own log
(hypeman's ``source=hypeman`` maps to ``ops``)."""

LOG_SOURCES: Final[tuple[str, ...]] = get_args(LogSource)

# A prefix is reused in stream names and KV bucket names, whose alphabet is [A-Za-z0-9_-].
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
# Characters that may never appear inside one NATS subject token.
_TOKEN_FORBIDDEN: Final = frozenset(".*>")
# Consumer (durable) names additionally forbid path separators.
_PATH_SEPARATORS: Final = frozenset("/\\")


def is_valid_token(token: str) -> bool:
    """True when ``token`` can be one NATS subject token: non-empty, printable, no whitespace,
    and none of ``.``, ``*``, ``>``."""
    if not token:
        return False
    return not any(ch in _TOKEN_FORBIDDEN or ch.isspace() or not ch.isprintable() for ch in token)


def is_valid_prefix(prefix: str) -> bool:
    """True when ``prefix`` is usable in subjects, stream names and KV bucket names."""
    return _PREFIX_RE.fullmatch(prefix) is not None


def image_key(name: str) -> str:
    """The images-bucket key of a normalised image reference (``docker.io/library/x:1``).

    References hold ``:`` and ``@``, which KV keys may not; unpadded URL-safe base64 only
    uses letters, digits, ``-`` and ``_``, and gateway and worker compute it the same way.
    """
    return base64.urlsafe_b64encode(name.encode()).decode("ascii").rstrip("=")


def _token(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid token, else raise ValueError naming ``kind``."""
    if not is_valid_token(value):
        raise ValueError(
            f"invalid {kind} {value!r}: must be one NATS token "
            "(non-empty; no dots, spaces, '*' or '>')"
        )
    return value


def _source(source: str) -> str:
    """Return ``source`` if it is a known log source, else raise ValueError."""
    if source not in LOG_SOURCES:
        raise ValueError(f"invalid log source {source!r}: expected one of {', '.join(LOG_SOURCES)}")
    return source


def _wild(kind: str, value: str | None) -> str:
    """A token, or ``*`` when ``value`` is None (used to build filters)."""
    return "*" if value is None else _token(kind, value)


@dataclass(frozen=True, slots=True)
class Subjects:
    """Names for one fleet, derived from ``prefix``. Cheap to build; pass it down explicitly."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not is_valid_prefix(self.prefix):
            raise ValueError(
                f"invalid subject prefix {self.prefix!r}: use letters, digits, '_' or '-'"
            )

    # -- lifecycle commands (JetStream work queue) -------------------------------------------
    def command(self, host: str, op: str) -> str:
        """Subject a command for ``host`` is published on; ``op`` is the command's tag."""
        return f"{self.prefix}.cmd.{_token('host id', host)}.{_token('op', op)}"

    def command_filter(self, host: str) -> str:
        """Filter subject of the durable consumer of ``host``."""
        return f"{self.prefix}.cmd.{_token('host id', host)}.>"

    @property
    def commands_all(self) -> str:
        """Subjects bound to the commands stream."""
        return f"{self.prefix}.cmd.>"

    @property
    def commands_stream(self) -> str:
        return f"{self._upper}_COMMANDS"

    def command_consumer(self, host: str) -> str:
        """Durable consumer name of the worker on ``host``."""
        _token("host id", host)
        if any(ch in _PATH_SEPARATORS for ch in host):
            raise ValueError(f"invalid host id {host!r}: no '/' or '\\' in consumer names")
        return f"worker_{host}"

    def parse_command(self, subject: str) -> tuple[str, str]:
        """``(host, op)`` of a command subject; ValueError if it is not one."""
        host, op = self._parse(subject, "cmd")
        return host, op

    # -- command results (core NATS) ---------------------------------------------------------
    def result(self, command_id: str) -> str:
        """Where the worker publishes the CommandResult of ``command_id``."""
        return f"{self.prefix}.result.{_token('command id', command_id)}"

    # -- state transitions (JetStream, limits) ------------------------------------------------
    def state(self, host: str, instance: str) -> str:
        return f"{self.prefix}.state.{_token('host id', host)}.{_token('instance id', instance)}"

    def state_filter(self, host: str | None = None, instance: str | None = None) -> str:
        """Filter for transitions; ``None`` means any host / any instance."""
        return f"{self.prefix}.state.{_wild('host id', host)}.{_wild('instance id', instance)}"

    @property
    def states_all(self) -> str:
        return f"{self.prefix}.state.>"

    @property
    def states_stream(self) -> str:
        return f"{self._upper}_STATES"

    def parse_state(self, subject: str) -> tuple[str, str]:
        """``(host, instance)`` of a state subject; ValueError if it is not one."""
        host, instance = self._parse(subject, "state")
        return host, instance

    # -- logs (JetStream, limits per subject) ------------------------------------------------
    def logs(self, instance: str, source: str) -> str:
        return f"{self.prefix}.logs.{_token('instance id', instance)}.{_source(source)}"

    def logs_filter(self, instance: str | None = None) -> str:
        """All sources of ``instance`` (or of every instance when None)."""
        return f"{self.prefix}.logs.{_wild('instance id', instance)}.*"

    @property
    def logs_all(self) -> str:
        return f"{self.prefix}.logs.>"

    @property
    def logs_stream(self) -> str:
        return f"{self._upper}_LOGS"

    def parse_logs(self, subject: str) -> tuple[str, str]:
        """``(instance, source)`` of a log subject; ValueError if it is not one."""
        instance, source = self._parse(subject, "logs")
        return instance, _source(source)

    # -- host-local queries (core request/reply) ---------------------------------------------
    def host_query(self, host: str, method: str) -> str:
        return f"{self.prefix}.host.{_token('host id', host)}.{_token('method', method)}"

    def host_query_filter(self, host: str) -> str:
        """What the worker on ``host`` subscribes to for queries."""
        return f"{self.prefix}.host.{_token('host id', host)}.*"

    # -- guest sessions (core NATS; schemas.sessions) ----------------------------------------
    def session_open(self, host: str) -> str:
        """Where a gateway asks ``host`` to open an exec or cp session (a host query)."""
        return self.host_query(host, "session")

    def autostandby_query(self, host: str) -> str:
        """Where a gateway asks ``host`` for an instance's auto-standby status or hold."""
        return self.host_query(host, "autostandby")

    def stat_query(self, host: str) -> str:
        """Where a gateway asks ``host`` to stat a path in one of its guests."""
        return self.host_query(host, "stat")

    def session_in(self, host: str, session: str) -> str:
        """Frames gateway → worker of one session; the host token lets NATS permissions
        confine a worker to its own sessions."""
        return f"{self._session(host, session)}.in"

    def session_out(self, host: str, session: str) -> str:
        """Frames worker → gateway of one session."""
        return f"{self._session(host, session)}.out"

    def session_filter(self, host: str | None, direction: Literal["in", "out"]) -> str:
        """Every session of ``host`` (or of any host when None) in one direction."""
        return f"{self.prefix}.sess.{_wild('host id', host)}.*.{direction}"

    def _session(self, host: str, session: str) -> str:
        return f"{self.prefix}.sess.{_token('host id', host)}.{_token('session id', session)}"

    # -- KV buckets --------------------------------------------------------------------------
    @property
    def instances_bucket(self) -> str:
        return f"{self.prefix}_instances"

    @property
    def hosts_bucket(self) -> str:
        return f"{self.prefix}_hosts"

    @property
    def volumes_bucket(self) -> str:
        return f"{self.prefix}_volumes"

    @property
    def drains_bucket(self) -> str:
        """KV: hosts an operator drained (key = host id): no new placements there."""
        return f"{self.prefix}_drains"

    @property
    def archives_bucket(self) -> str:
        """Object store: volume archives on their way from a gateway to a worker."""
        return f"{self.prefix}_archives"

    @property
    def snapshots_bucket(self) -> str:
        """KV: snapshot records (key = snapshot id), written by the hosts holding them."""
        return f"{self.prefix}_snapshots"

    @property
    def transfers_bucket(self) -> str:
        """Object store: snapshots and moved instances on their way between hosts
        (``schemas.transfers``; object names are bundle ids, not subjects)."""
        return f"{self.prefix}_transfers"

    @property
    def images_bucket(self) -> str:
        return f"{self.prefix}_images"

    @property
    def names_bucket(self) -> str:
        """KV: instance names claimed fleet-wide (key = the name), by the gateways."""
        return f"{self.prefix}_names"

    # -- helpers -----------------------------------------------------------------------------
    @property
    def _upper(self) -> str:
        """Stream-name stem: stream names cannot contain dots, and upper case is convention."""
        return self.prefix.upper()

    def _parse(self, subject: str, kind: str) -> tuple[str, str]:
        """Split ``<prefix>.<kind>.<a>.<b>`` into ``(a, b)``."""
        parts = subject.split(".")
        if len(parts) != 4 or parts[0] != self.prefix or parts[1] != kind:
            raise ValueError(f"not a {self.prefix}.{kind}.<a>.<b> subject: {subject!r}")
        if not (is_valid_token(parts[2]) and is_valid_token(parts[3])):
            raise ValueError(f"wildcard or empty token in subject {subject!r}")
        return parts[2], parts[3]
