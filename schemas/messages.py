"""NATS payloads exchanged by gateway and worker, and the KV records they share.

Why these rules:

* **Rolling upgrades.** Gateways and workers of different versions run side by side, so every
  payload ignores unknown fields and every field added later must have a default. Required
  fields are only the ones without which the message is meaningless.
* **Commands are one tagged union** on ``Command(tag_field="op", tag=str.lower)``: the JSON
  carries ``"op": "create"``, ``"op": "attachvolume"``..., the worker decodes with one Decoder
  (``schemas.codec.decode_command``) and dispatches with ``match``. ``Command.op`` is also
  the last token of the command subject (``Subjects.command(host, cmd.op)``).
* **Internal values are typed, not formatted**: sizes in bytes, states as ``InstanceState``.
  Only ``to_api()`` turns a record into the HTTP shape, so every gateway renders an instance
  the same way, from one place.
* Timestamps are aware ``datetime`` values (UTC by convention).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from schemas import api
from schemas.api import Hypervisor, ImageStatus, InstanceState, PortMapping, Timestamp
from schemas.autostandby import (
    AutoStandbySpec,
    AutoStandbyState,
    StandbyCause,
    TransitionCause,
    WakeCause,
)
from schemas.clock import utc_now
from schemas.errors import ErrorInfo
from schemas.sizes import format_rate, format_size
from schemas.snapshots import ForkSource, ScheduleState, SnapshotKind, TargetState
from schemas.subjects import LogSource

__all__ = [
    "DEFAULT_CPU_OVERCOMMIT",
    "DEFAULT_MEMORY_OVERCOMMIT",
    "AnyCommand",
    "AttachVolume",
    "Command",
    "CommandResult",
    "Create",
    "CreateVolume",
    "Delete",
    "DeleteImage",
    "DeleteVolume",
    "DetachVolume",
    "DrainRecord",
    "ExportInstance",
    "FetchSnapshot",
    "FinishMove",
    "HealthCheckSpec",
    "HealthState",
    "HostRecord",
    "ImageRecord",
    "ImportInstance",
    "InstanceCommand",
    "InstanceRecord",
    "LogLine",
    "MountSpec",
    "NameClaim",
    "PublishSnapshot",
    "PullImage",
    "RestartPolicySpec",
    "RestartState",
    "Restore",
    "Standby",
    "Start",
    "StateEvent",
    "StatsReply",
    "Stop",
    "Update",
    "VolumeRecord",
    "host_port_key",
]


class MountSpec(msgspec.Struct, kw_only=True):
    """A volume mount with its overlay size in bytes (0 when there is no overlay)."""

    volume_id: str
    mount_path: str
    readonly: bool = False
    overlay: bool = False
    overlay_bytes: int = 0

    def to_api(self) -> api.VolumeMount:
        """hypeman's shape: overlay fields only when the mount has an overlay."""
        if not self.overlay:
            return api.VolumeMount(
                volume_id=self.volume_id, mount_path=self.mount_path, readonly=self.readonly
            )
        return api.VolumeMount(
            volume_id=self.volume_id,
            mount_path=self.mount_path,
            readonly=self.readonly,
            overlay=True,
            overlay_size=format_size(self.overlay_bytes),
        )


class RestartPolicySpec(msgspec.Struct, frozen=True, kw_only=True):
    """A checked ``restart_policy`` (``never`` is stored as no policy at all)."""

    policy: Literal["always", "on_failure"]
    backoff_s: float = 5.0
    #: 0: unlimited.
    max_attempts: int = 0
    stable_after_s: float = 600.0

    def to_api(self) -> api.RestartPolicy:
        return api.RestartPolicy(
            policy=self.policy,
            backoff=api.go_duration(self.backoff_s),
            max_attempts=self.max_attempts or UNSET,
            stable_after=api.go_duration(self.stable_after_s),
        )


class RestartState(msgspec.Struct, frozen=True, kw_only=True):
    """Where the restart policy stands: a durable decision. ``next_attempt_at`` is the
    scheduled restart; the owning worker's supervisor takes it when due (also after the
    worker itself restarted)."""

    attempts: int = 0
    blocked_reason: Literal["manual_stop", "max_attempts_exceeded"] | None = None
    last_attempt_at: Timestamp | None = None
    next_attempt_at: Timestamp | None = None
    last_reason: Literal["health_check_failed"] | None = None

    def to_api(self) -> api.RestartStatus | UnsetType:
        """hypeman's ``restart_status``: left out while there is nothing to say."""
        if self == RestartState():
            return UNSET
        return api.RestartStatus(
            attempts=self.attempts,
            blocked_reason=self.blocked_reason or UNSET,
            last_attempt_at=self.last_attempt_at or UNSET,
            next_attempt_at=self.next_attempt_at or UNSET,
            last_reason=self.last_reason or UNSET,
        )


class HealthCheckSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A checked ``health_check`` with hypeman's defaults filled in (``type: none`` is
    stored as no check at all). ``port`` is the guest port of an http or tcp check."""

    type: Literal["http", "tcp", "exec"]
    port: int = 0
    path: str = "/"
    scheme: Literal["http", "https"] = "http"
    expected_status: int = 200
    command: list[str] = []
    working_dir: str = ""
    interval_s: float = 10.0
    timeout_s: float = 2.0
    start_period_s: float = 30.0
    failure_threshold: int = 3
    success_threshold: int = 1

    def to_api(self) -> api.HealthCheck:
        return api.HealthCheck(
            type=self.type,
            http=api.HealthCheckHTTP(
                port=self.port,
                path=self.path,
                scheme=self.scheme,
                expected_status=self.expected_status,
            )
            if self.type == "http"
            else UNSET,
            tcp=api.HealthCheckTCP(port=self.port) if self.type == "tcp" else UNSET,
            exec=api.HealthCheckExec(
                command=list(self.command), working_dir=self.working_dir or UNSET
            )
            if self.type == "exec"
            else UNSET,
            interval=api.go_duration(self.interval_s),
            timeout=api.go_duration(self.timeout_s),
            start_period=api.go_duration(self.start_period_s),
            failure_threshold=self.failure_threshold,
            success_threshold=self.success_threshold,
        )


class HealthState(msgspec.Struct, frozen=True, kw_only=True):
    """Where the health check stands in the current window (a start, a restore or a new
    check opens one). ``status`` is what the checks decided; :meth:`to_api` reports
    ``unknown`` or ``starting`` instead while the instance's state says so."""

    status: Literal["starting", "healthy", "unhealthy"] = "starting"
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_checked_at: Timestamp | None = None
    last_success_at: Timestamp | None = None
    last_failure_at: Timestamp | None = None
    last_error: str | None = None
    #: When the window began: failures before ``start_period`` after it never count.
    window_started_at: Timestamp | None = None

    def status_in(self, state: InstanceState, checked: bool) -> api.HealthStatusName:
        """hypeman's ``health_status.status`` for an instance in ``state``."""
        if not checked:
            return "disabled"
        if state is InstanceState.INITIALIZING:
            return "starting"
        if state is not InstanceState.RUNNING:
            return "unknown"
        return self.status

    def to_api(self, state: InstanceState, checked: bool) -> api.InstanceHealthStatus:
        status = self.status_in(state, checked)
        if status in ("disabled", "unknown"):
            # As hypeman reports them: no check, or no window running, has no counts.
            return api.InstanceHealthStatus(
                status=status, consecutive_failures=0, consecutive_successes=0
            )
        return api.InstanceHealthStatus(
            status=status,
            consecutive_failures=self.consecutive_failures,
            consecutive_successes=self.consecutive_successes,
            last_checked_at=self.last_checked_at or UNSET,
            last_success_at=self.last_success_at or UNSET,
            last_failure_at=self.last_failure_at or UNSET,
            last_error=self.last_error if self.last_error is not None else UNSET,
        )


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


class Command(msgspec.Struct, tag_field="op", tag=str.lower, frozen=True, kw_only=True):
    """Base of every command. ``id`` is the command id and idempotency key (it becomes the
    ``Nats-Msg-Id`` header, so a retried HTTP call is deduplicated by JetStream)."""

    id: str
    issued_at: Timestamp

    @property
    def op(self) -> str:
        """The tag (``"create"``, ``"attachvolume"``...), also the subject's op token."""
        tag = type(self).__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class InstanceCommand(Command, frozen=True, kw_only=True):
    """A command about one instance (every lifecycle op)."""

    instance_id: str


class Create(InstanceCommand, frozen=True, kw_only=True):
    """Create and boot an instance. The gateway has already parsed and defaulted every value:
    the worker never parses size strings."""

    name: str
    image: str
    image_digest: str = ""
    size_bytes: int
    hotplug_bytes: int = 0
    overlay_bytes: int
    disk_io_bps: int = 0
    vcpus: int
    env: dict[str, str] = {}
    volumes: list[MountSpec] = []
    port_mappings: list[PortMapping] = []
    network_enabled: bool = True
    bandwidth_download_bps: int = 0
    bandwidth_upload_bps: int = 0
    #: None: whichever the chosen host runs (the request named none).
    hypervisor: Hypervisor | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    tags: dict[str, str] = {}
    #: When the instance is deleted on its own (the gateway turned a ttl into this).
    expires_at: Timestamp | None = None
    restart_policy: RestartPolicySpec | None = None
    health_check: HealthCheckSpec | None = None
    auto_standby: AutoStandbySpec | None = None
    #: A fork: the instance is made from this snapshot instead of booting its image.
    fork: ForkSource | None = None

    @property
    def disk_bytes(self) -> int:
        """Disk the instance's own files may take: its overlay and its volumes' overlays."""
        return self.overlay_bytes + sum(m.overlay_bytes for m in self.volumes if m.overlay)

    def new_record(
        self,
        *,
        host: str,
        hypervisor: Hypervisor,
        created_at: Timestamp,
        ip: str | None = None,
        mac: str | None = None,
    ) -> InstanceRecord:
        """The record of the instance this command makes, before anything is made."""
        return InstanceRecord(
            id=self.instance_id,
            name=self.name,
            image=self.image,
            image_digest=self.image_digest,
            host=host,
            state=InstanceState.CREATED,
            size_bytes=self.size_bytes,
            hotplug_bytes=self.hotplug_bytes,
            overlay_bytes=self.overlay_bytes,
            disk_io_bps=self.disk_io_bps,
            vcpus=self.vcpus,
            env=dict(self.env),
            volumes=list(self.volumes),
            port_mappings=list(self.port_mappings),
            network_enabled=self.network_enabled,
            ip=ip,
            mac=mac,
            bandwidth_download_bps=self.bandwidth_download_bps,
            bandwidth_upload_bps=self.bandwidth_upload_bps,
            hypervisor=self.hypervisor or hypervisor,
            cmd=self.cmd,
            entrypoint=self.entrypoint,
            created_at=created_at,
            tags=dict(self.tags),
            expires_at=self.expires_at,
            restart_policy=self.restart_policy,
            health_check=self.health_check,
            auto_standby=self.auto_standby,
            health=HealthState(window_started_at=created_at),
            phase_since=created_at,
        )


class Start(InstanceCommand, frozen=True, kw_only=True):
    """Boot a stopped instance (optionally overriding cmd/entrypoint, as the newer SDK can)."""

    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    #: Set by the owning worker's supervisor: an automatic restart, taken only if the
    #: record still schedules it (else the command does nothing).
    restart: bool = False


class Stop(InstanceCommand, frozen=True, kw_only=True):
    """Shut an instance down."""

    #: Set by the owning worker's health checks: not a user's stop (no block), but the
    #: first half of a restart the policy schedules, for this reason.
    restart_reason: Literal["health_check_failed"] | None = None


class Standby(InstanceCommand, frozen=True, kw_only=True):
    """Pause, snapshot and stop the VMM."""

    #: ``idle``: sent by the owning worker's auto-standby controller.
    cause: StandbyCause = "api"


class Restore(InstanceCommand, frozen=True, kw_only=True):
    """Restore a standby instance from its snapshot."""

    #: ``connection``: sent by the owning worker's wake listener.
    cause: WakeCause = "api"


class Delete(InstanceCommand, frozen=True, kw_only=True):
    """Delete an instance from any state."""


class Update(InstanceCommand, frozen=True, kw_only=True):
    """Change what can change without touching the VM (``PATCH /instances/{id}``); sent to
    the owning worker so that the record keeps one writer. For the expiry: ``ttl_s`` counts
    from when the worker applies it (0 clears the expiry), else ``expires_at`` if set; with
    neither, the expiry stays as it is."""

    ttl_s: float | None = None
    expires_at: Timestamp | None = None
    #: A new restart policy (None: ``never``); left out: unchanged.
    restart_policy: RestartPolicySpec | UnsetType | None = UNSET
    #: A new health check (None: none); left out: unchanged.
    health_check: HealthCheckSpec | UnsetType | None = UNSET
    #: A new auto-standby policy (None: none); left out: unchanged.
    auto_standby: AutoStandbySpec | UnsetType | None = UNSET


class AttachVolume(InstanceCommand, frozen=True, kw_only=True):
    """Attach a volume to an instance."""

    volume_id: str
    mount_path: str
    readonly: bool = False
    overlay: bool = False
    overlay_bytes: int = 0


class DetachVolume(InstanceCommand, frozen=True, kw_only=True):
    """Detach a volume from an instance."""

    volume_id: str


class CreateSnapshot(InstanceCommand, frozen=True, kw_only=True):
    """Save the instance as snapshot ``snapshot_id`` (kind Standby: memory + disks, the VM
    paused only for the copy; Stopped: disks only). The instance stays as it was."""

    snapshot_id: str
    kind: SnapshotKind
    name: str | None = None
    tags: dict[str, str] = {}
    #: Taken by the instance's schedule: its retention may delete it.
    scheduled: bool = False


class RestoreSnapshot(InstanceCommand, frozen=True, kw_only=True):
    """Put the instance back to a snapshot of it, in place (same id, name and address)."""

    snapshot_id: str
    target_state: TargetState | None = None


class SetSnapshotSchedule(InstanceCommand, frozen=True, kw_only=True):
    """Set (or with None, remove) the instance's snapshot schedule; its worker runs it."""

    schedule: ScheduleState | None = None


class DeleteSnapshot(Command, frozen=True, kw_only=True):
    """Delete the host's copy of a snapshot (and its record, on the host that took it)."""

    snapshot_id: str


class ExportInstance(Command, frozen=True, kw_only=True):
    """Move, step 1, to the instance's host: upload the Standby instance's files to the
    transfers store as ``bundle`` (worker.transfer.move). The instance stays there,
    refusing other commands, until FinishMove."""

    instance_id: str
    bundle: str


class ImportInstance(Command, frozen=True, kw_only=True):
    """Move, step 2, to the new host: fetch ``bundle``, verify it, take the instance in
    (same id, name, memory and disks) and write its record, which now names this host."""

    instance_id: str
    bundle: str
    record: InstanceRecord


class FinishMove(Command, frozen=True, kw_only=True):
    """Move, step 3, to the old host: ``moved`` — the record names the new host, delete
    the local copy; not ``moved`` — the move failed, the instance is here as before."""

    instance_id: str
    bundle: str
    moved: bool


class PublishSnapshot(Command, frozen=True, kw_only=True):
    """Cross-host fork, step 1, to a host holding the snapshot: put it into the transfers
    store as ``bundle`` (done once: a bundle already there is left as it is)."""

    snapshot_id: str
    bundle: str


class FetchSnapshot(Command, frozen=True, kw_only=True):
    """Cross-host fork, step 2, to the host the fork is placed on: fetch and verify the
    snapshot (once per host; kept in its transfer cache) and list this host in its record.
    Then the fork's Create goes there as to any host holding the snapshot."""

    snapshot_id: str
    bundle: str


class CreateVolume(Command, frozen=True, kw_only=True):
    """Create an empty ext4 volume on the host the command is addressed to."""

    volume_id: str
    name: str
    size_gb: int
    #: A tar.gz in the archives object store to fill the volume with (None: empty volume).
    #: The worker deletes the object once the volume exists.
    archive: str | None = None


class DeleteVolume(Command, frozen=True, kw_only=True):
    """Delete a volume's data on the host the command is addressed to."""

    volume_id: str


class PullImage(Command, frozen=True, kw_only=True):
    """Pull and convert an image on the host the command is addressed to."""

    image: str
    digest: str = ""


class DeleteImage(Command, frozen=True, kw_only=True):
    """Remove the image of ``digest`` (its disk, tags and unshared blobs) from the host the
    command is addressed to; the fleet has forgotten every name of it by then. A host that
    does not have it answers ``not_found``, one whose instances use it ``conflict``."""

    digest: str


AnyCommand = (
    Create
    | Start
    | Stop
    | Standby
    | Restore
    | Delete
    | Update
    | AttachVolume
    | DetachVolume
    | CreateVolume
    | DeleteVolume
    | PullImage
    | DeleteImage
    | CreateSnapshot
    | RestoreSnapshot
    | SetSnapshotSchedule
    | DeleteSnapshot
    | ExportInstance
    | ImportInstance
    | FinishMove
    | PublishSnapshot
    | FetchSnapshot
)
"""Every concrete command; the type ``schemas.codec.decode_command`` returns."""


# --------------------------------------------------------------------------------------------
# Records (KV values) and their API renderings
# --------------------------------------------------------------------------------------------


class InstanceRecord(msgspec.Struct, kw_only=True):
    """The KV value of one instance (key = id): everything the API shows, plus what the worker
    needs to rebuild the VM. The worker writes it; gateways only read it."""

    id: str
    name: str
    image: str
    image_digest: str = ""
    host: str
    state: InstanceState
    state_error: str | None = None
    size_bytes: int
    hotplug_bytes: int = 0
    overlay_bytes: int
    disk_io_bps: int = 0
    vcpus: int
    env: dict[str, str] = {}
    volumes: list[MountSpec] = []
    port_mappings: list[PortMapping] = []
    network_enabled: bool = True
    ip: str | None = None
    mac: str | None = None
    tap: str | None = None
    bandwidth_download_bps: int = 0
    bandwidth_upload_bps: int = 0
    hypervisor: Hypervisor
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    has_snapshot: bool = False
    created_at: Timestamp
    started_at: Timestamp | None = None
    stopped_at: Timestamp | None = None
    #: The last command applied to this instance: a redelivered command with this id has
    #: already taken effect and is answered, not executed again.
    last_command_id: str | None = None
    tags: dict[str, str] = {}
    #: When the owning worker deletes the instance on its own (None: never).
    expires_at: Timestamp | None = None
    #: How the app ended, read from the guest's exit marker (None: it has not, or a VMM
    #: that died without one); cleared by the next start.
    exit_code: int | None = None
    exit_message: str | None = None
    restart_policy: RestartPolicySpec | None = None
    restart: RestartState = msgspec.field(default_factory=RestartState)
    health_check: HealthCheckSpec | None = None
    health: HealthState = msgspec.field(default_factory=HealthState)
    #: Milliseconds spent in each state left so far (lowercase names), and when the
    #: current state began (None: a record older than these; nothing is reported).
    phase_ms: dict[str, int] = {}
    phase_since: Timestamp | None = None
    auto_standby: AutoStandbySpec | None = None
    #: The auto-standby controller's idle clock and hold (worker.autostandby).
    idle: AutoStandbyState = msgspec.field(default_factory=AutoStandbyState)
    #: The cause of the last standby or restore, set on its first step: ``idle`` means
    #: the instance sleeps by its policy (its mapped ports then wake it).
    cause: TransitionCause | None = None
    #: The instance's snapshot schedule (None: none); its worker takes the snapshots.
    snapshot_schedule: ScheduleState | None = None

    def to_api(self) -> api.Instance:
        """Render hypeman's Instance: sizes in HR form, empty optionals left out."""
        return api.Instance(
            id=self.id,
            name=self.name,
            image=self.image,
            state=self.state,
            state_error=self.state_error,
            size=format_size(self.size_bytes),
            hotplug_size=format_size(self.hotplug_bytes),
            overlay_size=format_size(self.overlay_bytes),
            vcpus=self.vcpus,
            disk_io_bps=format_rate(self.disk_io_bps) if self.disk_io_bps > 0 else UNSET,
            env=dict(self.env) if self.env else UNSET,
            network=self._network(),
            volumes=[v.to_api() for v in self.volumes] if self.volumes else UNSET,
            port_mappings=list(self.port_mappings) if self.port_mappings else UNSET,
            created_at=self.created_at,
            started_at=self.started_at,
            stopped_at=self.stopped_at,
            has_snapshot=self.has_snapshot,
            hypervisor=self.hypervisor,
            host=self.host,
            tags=dict(self.tags) if self.tags else UNSET,
            expires_at=self.expires_at if self.expires_at is not None else UNSET,
            exit_code=self.exit_code if self.exit_code is not None else UNSET,
            exit_message=self.exit_message if self.exit_message is not None else UNSET,
            restart_policy=self.restart_policy.to_api() if self.restart_policy else UNSET,
            restart_status=self.restart.to_api(),
            health_check=self.health_check.to_api() if self.health_check else UNSET,
            # Always present, as hypeman's current API sends it (its instanceToOAPI sets it
            # from the check's snapshot): {"status": "disabled", ...} without a check. The
            # older example Instance of the reference predates health checks.
            health_status=self.health.to_api(self.state, self.health_check is not None),
            auto_standby=self.auto_standby.to_api() if self.auto_standby else UNSET,
            **self._phases(),
        )

    def entered(self, now: Timestamp) -> dict[str, object]:
        """The phase fields of a change of state at ``now``: the state left is counted."""
        if self.phase_since is None:
            return {"phase_since": now}
        phases = dict(self.phase_ms)
        name = self.state.value.lower()
        phases[name] = phases.get(name, 0) + _ms(now - self.phase_since)
        return {"phase_ms": phases, "phase_since": now}

    def _phases(self) -> dict[str, Any]:
        if self.phase_since is None:
            return {}
        current = self.state.value.lower()
        durations = dict(self.phase_ms)
        durations[current] = durations.get(current, 0) + _ms(utc_now() - self.phase_since)
        return {
            "current_phase": current,
            "current_phase_since": self.phase_since,
            "phase_durations_ms": durations,
        }

    @property
    def health_status(self) -> api.HealthStatusName:
        """The health status a user sees now (``disabled`` without a check)."""
        return self.health.status_in(self.state, self.health_check is not None)

    def expired(self, now: Timestamp) -> bool:
        """Whether the instance's deadline has passed (its worker then deletes it)."""
        return self.expires_at is not None and self.expires_at <= now

    def has_tags(self, wanted: dict[str, str]) -> bool:
        """Whether every pair of ``wanted`` is among the instance's tags."""
        tags = self.tags
        return all(tags.get(key) == value for key, value in wanted.items())

    def _network(self) -> api.InstanceNetwork:
        """hypeman: name/ip/mac only when enabled; bandwidths whenever > 0."""
        down, up = self.bandwidth_download_bps, self.bandwidth_upload_bps
        return api.InstanceNetwork(
            enabled=self.network_enabled,
            name="default" if self.network_enabled else UNSET,
            ip=self.ip if self.network_enabled else None,
            mac=self.mac if self.network_enabled else None,
            bandwidth_download=format_rate(down) if down > 0 else UNSET,
            bandwidth_upload=format_rate(up) if up > 0 else UNSET,
        )


def _ms(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds() * 1000))


class VolumeRecord(msgspec.Struct, kw_only=True):
    """The KV value of one volume (key = id). ``host`` holds its data (None until created)."""

    id: str
    name: str
    size_gb: int
    host: str | None = None
    attachments: list[api.VolumeAttachment] = []
    created_at: Timestamp

    def to_api(self) -> api.Volume:
        """hypeman stores volume timestamps with second precision; so does the rendering."""
        return api.Volume(
            id=self.id,
            name=self.name,
            size_gb=self.size_gb,
            created_at=self.created_at.replace(microsecond=0),
            attachments=list(self.attachments) if self.attachments else UNSET,
        )


class ImageRecord(msgspec.Struct, kw_only=True):
    """The KV value of one image (fleet view). ``hosts`` lists hosts holding it ready."""

    name: str
    digest: str
    status: ImageStatus
    queue_position: int | None = None
    error: str | None = None
    size_bytes: int | None = None
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    working_dir: str | None = None
    created_at: Timestamp
    hosts: list[str] = []

    def to_api(self) -> api.Image:
        """hypeman sends empty cmd/entrypoint as null and leaves an empty env out."""
        return api.Image(
            name=self.name,
            digest=self.digest,
            status=self.status,
            queue_position=self.queue_position,
            error=self.error,
            size_bytes=self.size_bytes,
            entrypoint=list(self.entrypoint) or None,
            cmd=list(self.cmd) or None,
            env=dict(self.env) if self.env else UNSET,
            working_dir=self.working_dir,
            created_at=self.created_at,
        )


#: How many vCPUs per host CPU, and bytes of guest memory per byte of RAM, a host takes
#: unless the operator says otherwise (VMFLEET_CPU_OVERCOMMIT, VMFLEET_MEMORY_OVERCOMMIT):
#: gateways place by these ratios and workers refuse by them, so both read them from here.
DEFAULT_CPU_OVERCOMMIT: float = 4.0
DEFAULT_MEMORY_OVERCOMMIT: float = 1.0


class HostRecord(msgspec.Struct, kw_only=True):
    """Heartbeat of one worker (KV ``hosts``, key = host id, short max age): liveness and the
    capacity the gateway places instances with."""

    id: str
    address: str = ""
    hypervisors: list[Hypervisor] = []
    accel: Literal["kvm", "tcg"] = "tcg"
    vcpus_total: int = 0
    vcpus_allocated: int = 0
    memory_total_bytes: int = 0
    memory_allocated_bytes: int = 0
    disk_total_bytes: int = 0
    disk_free_bytes: int = 0
    #: What this host's disks may still take of ``disk_free_bytes``: instance overlays and
    #: volumes are sparse files, each counted at its size less what it holds already.
    disk_promised_bytes: int = 0
    instances: int = 0
    version: str = ""
    labels: dict[str, str] = {}
    #: Host ports held by this host's instances, whatever their state (``host_port_key``).
    ports: list[str] = []
    #: Images ready on this host: each one's digest and the name it was pulled as.
    images: list[str] = []
    #: How its instances are networked: ``user`` or ``bridge`` ("": a worker too old to say).
    #: Only bridge mode can enforce bandwidth limits.
    network_mode: str = ""
    started_at: Timestamp
    heartbeat_at: Timestamp
    #: Set by the gateway from the drains bucket when it shows the host (workers leave it).
    drained: bool = False
    #: What keeps this worker from doing its work, e.g. it cannot fetch its commands ("":
    #: nothing does).
    problem: str = ""


def host_port_key(host_port: int, protocol: str | None = "tcp") -> str:
    """``"8080/tcp"``: how a host port in use is named in ``HostRecord.ports``."""
    return f"{host_port}/{protocol or 'tcp'}"


class DrainRecord(msgspec.Struct, kw_only=True):
    """An operator drained a host (KV ``drains``, key = host id): placement skips it."""

    host: str
    drained_at: Timestamp
    reason: str = ""


class NameClaim(msgspec.Struct, kw_only=True):
    """A gateway's claim on an instance name (KV ``names``, key = the name), made with a KV
    create before the instance is placed, removed when the instance is deleted."""

    instance_id: str
    claimed_at: Timestamp


# --------------------------------------------------------------------------------------------
# Replies and events
# --------------------------------------------------------------------------------------------


class CommandResult(msgspec.Struct, kw_only=True):
    """Outcome of one command, published once it is recorded (``Subjects.result``).

    ``ok`` with the affected record, or not ``ok`` with ``error`` (``schemas.errors.ErrorInfo``:
    status, code, message; the gateway re-raises it with ``error_from_info``).
    """

    command_id: str
    ok: bool
    instance: InstanceRecord | None = None
    volume: VolumeRecord | None = None
    image: ImageRecord | None = None
    error: ErrorInfo | None = None


class StateEvent(msgspec.Struct, kw_only=True):
    """One state transition of an instance (stream ``states``). ``seq`` orders events of one
    instance; ``command_id`` names the command that caused it, if any."""

    instance_id: str
    name: str = ""
    host: str
    previous: InstanceState | None = None
    state: InstanceState
    error: str | None = None
    at: Timestamp
    seq: int = 0
    command_id: str | None = None
    #: The instance is gone (deleted, or its create failed); ``state`` is its last state.
    deleted: bool = False
    #: ``state``: a transition (``previous`` -> ``state``); ``health``: the health status
    #: changed to ``health`` and the state did not (``previous`` == ``state``);
    #: ``snapshot``: a snapshot of the instance was ``created`` or ``deleted``; ``fork``: the
    #: instance, a fork, ``started`` or ``finished`` (or ``failed``) being made from
    #: ``snapshot_id`` of ``source_instance_id``. ``state`` is the instance's state then.
    kind: Literal["state", "health", "snapshot", "fork"] = "state"
    action: Literal["created", "deleted", "started", "finished", "failed"] | None = None
    snapshot_id: str | None = None
    source_instance_id: str | None = None
    #: The instance's health status after the event (None from older workers).
    health: api.HealthStatusName | None = None
    #: On the steps of a standby or restore: why (a standby event is the step into
    #: Standby; a wake is Paused -> Running); None on any other transition.
    cause: TransitionCause | None = None


class LogLine(msgspec.Struct, kw_only=True):
    """One log line (no trailing newline) of one source of one instance."""

    instance_id: str
    source: LogSource
    seq: int = 0
    line: str
    at: Timestamp


class StatsReply(msgspec.Struct, kw_only=True):
    """A host's answer to ``Subjects.host_query(host, "stats")`` (the request's payload is
    the instance id): the instance's usage, or why there is none."""

    stats: api.InstanceStats | None = None
    error: ErrorInfo | None = None
