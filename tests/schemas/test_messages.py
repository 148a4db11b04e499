"""NATS payloads: the command union, tolerant decoding, and record -> API rendering."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TypedDict

import msgspec
import pytest

from schemas import api, codec
from schemas.errors import ErrorInfo, InvalidState, error_from_info
from schemas.messages import (
    AnyCommand,
    AttachVolume,
    Command,
    CommandResult,
    Create,
    CreateVolume,
    Delete,
    DeleteVolume,
    DetachVolume,
    HostRecord,
    ImageRecord,
    InstanceCommand,
    InstanceRecord,
    LogLine,
    MountSpec,
    PullImage,
    Restore,
    Standby,
    Start,
    StateEvent,
    Stop,
    VolumeRecord,
)
from schemas.sizes import GIB, MIB

from .test_api import HYPEMAN_INSTANCE

T0 = datetime(2026, 1, 16, 10, 30, 0, 512340, tzinfo=UTC)
T1 = datetime(2026, 1, 16, 10, 30, 1, 900000, tzinfo=UTC)


class _Base(TypedDict):
    id: str
    issued_at: datetime


class _Inst(_Base):
    instance_id: str


BASE: _Base = {"id": "c1", "issued_at": T0}
INST: _Inst = {"id": "c1", "issued_at": T0, "instance_id": "tz4a98xxat96iws9zmbrgj3a"}


COMMANDS: list[Command] = [
    Create(
        **INST,
        name="web",
        image="docker.io/library/nginx:alpine",
        size_bytes=GIB,
        overlay_bytes=10 * GIB,
        vcpus=2,
        hypervisor=api.Hypervisor.QEMU,
        volumes=[MountSpec(volume_id="v1", mount_path="/data")],
        port_mappings=[api.PortMapping(host_port=8080, guest_port=80)],
        cmd=["nginx", "-g", "daemon off;"],
    ),
    Start(**INST),
    Stop(**INST),
    Standby(**INST),
    Restore(**INST),
    Delete(**INST),
    AttachVolume(**INST, volume_id="v1", mount_path="/mnt/v"),
    DetachVolume(**INST, volume_id="v1"),
    CreateVolume(**BASE, volume_id="v1", name="data", size_gb=1),
    DeleteVolume(**BASE, volume_id="v1"),
    PullImage(**BASE, image="docker.io/library/alpine:latest"),
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.op)
def test_commands_round_trip_through_the_union(cmd: Command) -> None:
    data = codec.encode(cmd)
    assert json.loads(data)["op"] == cmd.op == type(cmd).__name__.lower()
    assert codec.decode_command(data) == cmd


def test_unknown_fields_are_ignored_and_new_fields_default() -> None:
    data = json.dumps(
        {
            "op": "create",
            "id": "c1",
            "instance_id": "i1",
            "issued_at": "2026-01-16T10:30:00Z",
            "name": "web",
            "image": "alpine",
            "size_bytes": GIB,
            "overlay_bytes": GIB,
            "vcpus": 1,
            "hypervisor": "qemu",
            "added_in_a_later_version": {"x": [1, 2]},
        }
    ).encode()
    cmd = codec.decode_command(data)
    assert isinstance(cmd, Create)
    assert cmd.env == {} and cmd.volumes == [] and cmd.network_enabled is True
    assert cmd.cmd is None and cmd.hotplug_bytes == 0


def test_unknown_op_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.op"):
        codec.decode_command(b'{"op":"explode","id":"c","issued_at":"2026-01-16T10:30:00Z"}')


def test_instance_command_requires_instance_id() -> None:
    with pytest.raises(msgspec.ValidationError, match="instance_id"):
        codec.decode_command(b'{"op":"stop","id":"c","issued_at":"2026-01-16T10:30:00Z"}')


def _describe(cmd: AnyCommand) -> str:
    """What a worker's dispatcher looks like: one match over the union."""
    match cmd:
        case Create(name=name):
            return f"create {name}"
        case InstanceCommand(instance_id=iid):
            return f"{cmd.op} {iid}"
        case CreateVolume() | DeleteVolume():
            return f"{cmd.op} {cmd.volume_id}"
        case PullImage(image=image):
            return f"pull {image}"
    raise AssertionError(cmd)


def test_match_dispatch() -> None:
    described = [_describe(codec.decode_command(codec.encode(c))) for c in COMMANDS]
    assert described[0] == "create web"
    assert described[2] == "stop tz4a98xxat96iws9zmbrgj3a"
    assert described[-1] == "pull docker.io/library/alpine:latest"


def _record(**overrides: object) -> InstanceRecord:
    values: dict[str, object] = {
        "id": "tz4a98xxat96iws9zmbrgj3a",
        "name": "web",
        "image": "docker.io/library/nginx:alpine",
        "host": "h1",
        "state": api.InstanceState.RUNNING,
        "size_bytes": GIB,
        "hotplug_bytes": 3 * GIB,
        "overlay_bytes": 10 * GIB,
        "disk_io_bps": 250 * MIB,
        "vcpus": 2,
        "ip": "10.100.37.201",
        "mac": "02:00:00:5e:a1:0c",
        "bandwidth_download_bps": 125_000_000,
        "bandwidth_upload_bps": 125_000_000,
        "hypervisor": api.Hypervisor.CLOUD_HYPERVISOR,
        "created_at": T0,
        "started_at": T1,
    }
    values.update(overrides)
    return msgspec.convert(values, InstanceRecord)


def test_record_renders_hypeman_example() -> None:
    rendered = json.loads(codec.encode(_record().to_api()))
    expected = json.loads(HYPEMAN_INSTANCE)
    assert rendered.pop("host") == "h1"
    # The example predates health checks; hypeman's current API adds this to every Instance.
    assert rendered.pop("health_status") == {
        "status": "disabled",
        "consecutive_failures": 0,
        "consecutive_successes": 0,
    }
    for key in ("created_at", "started_at"):
        assert datetime.fromisoformat(rendered.pop(key)) == datetime.fromisoformat(
            expected.pop(key)
        )
    assert rendered == expected


def test_record_without_network_or_extras() -> None:
    record = _record(
        network_enabled=False, disk_io_bps=0, bandwidth_download_bps=0, bandwidth_upload_bps=0
    )
    rendered = json.loads(codec.encode(record.to_api()))
    assert rendered["network"] == {"enabled": False, "ip": None, "mac": None}
    for absent in ("disk_io_bps", "env", "volumes", "port_mappings", "gpu"):
        assert absent not in rendered


def test_disabled_network_still_shows_bandwidth() -> None:
    rendered = json.loads(codec.encode(_record(network_enabled=False).to_api()))
    assert rendered["network"]["bandwidth_download"] == "119.2 MB/s"
    assert "name" not in rendered["network"]


def test_record_volumes_env_and_ports() -> None:
    record = _record(
        env={"PORT": "3000"},
        volumes=[
            MountSpec(volume_id="v1", mount_path="/data"),
            MountSpec(
                volume_id="v2",
                mount_path="/srv",
                readonly=True,
                overlay=True,
                overlay_bytes=GIB,
            ),
        ],
        port_mappings=[api.PortMapping(host_port=8080, guest_port=80)],
    )
    rendered = json.loads(codec.encode(record.to_api()))
    assert rendered["env"] == {"PORT": "3000"}
    assert rendered["volumes"] == [
        {"mount_path": "/data", "readonly": False, "volume_id": "v1"},
        {
            "mount_path": "/srv",
            "overlay": True,
            "overlay_size": "1024.0 MB",
            "readonly": True,
            "volume_id": "v2",
        },
    ]
    assert rendered["port_mappings"] == [{"guest_port": 80, "host_port": 8080, "protocol": "tcp"}]


def test_instance_record_round_trips_and_tolerates_new_fields() -> None:
    record = _record(state=api.InstanceState.UNKNOWN, state_error="boom")
    data = codec.encode(record)
    assert codec.decode_instance_record(data) == record
    extended = json.loads(data) | {"future": True}
    assert codec.decode_instance_record(json.dumps(extended).encode()) == record


def test_volume_record_renders_second_precision() -> None:
    record = VolumeRecord(
        id="v1",
        name="data",
        size_gb=10,
        host="h1",
        created_at=T0,
        attachments=[api.VolumeAttachment(instance_id="i1", mount_path="/data", readonly=False)],
    )
    rendered = json.loads(codec.encode(record.to_api()))
    assert rendered["created_at"] == "2026-01-16T10:30:00Z"
    assert rendered["attachments"] == [
        {"instance_id": "i1", "mount_path": "/data", "readonly": False}
    ]
    assert codec.decode_volume_record(codec.encode(record)) == record
    bare = VolumeRecord(id="v2", name="d", size_gb=1, created_at=T0)
    assert "attachments" not in json.loads(codec.encode(bare.to_api()))


def test_image_record_renders_nulls() -> None:
    record = ImageRecord(
        name="docker.io/library/alpine:latest",
        digest="sha256:ab",
        status=api.ImageStatus.READY,
        size_bytes=5 * MIB,
        cmd=["/bin/sh"],
        created_at=T0,
        hosts=["h1"],
    )
    rendered = json.loads(codec.encode(record.to_api()))
    assert rendered["entrypoint"] is None and rendered["cmd"] == ["/bin/sh"]
    assert rendered["working_dir"] is None and rendered["queue_position"] is None
    assert "env" not in rendered and "hosts" not in rendered
    assert codec.decode_image_record(codec.encode(record)) == record


def test_host_record_from_an_older_worker_gets_defaults() -> None:
    data = b'{"id":"h1","started_at":"2026-01-16T10:00:00Z","heartbeat_at":"2026-01-16T10:30:00Z"}'
    host = codec.decode_host_record(data)
    assert host.vcpus_total == 0 and host.labels == {} and host.hypervisors == []
    full = HostRecord(
        id="h1",
        address="10.0.0.1",
        hypervisors=[api.Hypervisor.QEMU],
        accel="kvm",
        vcpus_total=8,
        memory_total_bytes=16 * GIB,
        labels={"zone": "a"},
        started_at=T0,
        heartbeat_at=T1,
    )
    assert codec.decode_host_record(codec.encode(full)) == full


def test_command_result_and_error() -> None:
    ok = CommandResult(command_id="c1", ok=True, instance=_record())
    assert codec.decode_command_result(codec.encode(ok)) == ok
    failed = CommandResult(
        command_id="c2",
        ok=False,
        error=ErrorInfo(code="invalid_state", message="instance is Stopped", status=409),
    )
    body = json.loads(codec.encode(failed))
    assert body["instance"] is None and body["error"]["status"] == 409
    decoded = codec.decode_command_result(codec.encode(failed))
    assert decoded.error is not None
    assert isinstance(error_from_info(decoded.error), InvalidState)


def test_state_event_and_log_line() -> None:
    event = StateEvent(
        instance_id="i1",
        name="web",
        host="h1",
        previous=api.InstanceState.RUNNING,
        state=api.InstanceState.STOPPED,
        at=T0,
        seq=3,
        command_id="c1",
    )
    assert codec.decode_state_event(codec.encode(event)) == event
    line = LogLine(instance_id="i1", source="app", seq=7, line='hello "world"', at=T0)
    assert codec.decode_log_line(codec.encode(line)) == line


def test_log_line_rejects_unknown_source() -> None:
    data = b'{"instance_id":"i1","source":"hypeman","line":"x","at":"2026-01-16T10:30:00Z"}'
    with pytest.raises(msgspec.ValidationError, match=r"\$\.source"):
        codec.decode_log_line(data)
