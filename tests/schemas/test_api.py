"""HTTP shapes against hypeman's spec: field sets, null-versus-omitted, examples, validation."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from schemas import api, codec

# hypeman's wire contract, as vendored with the gateway (which serves what it implements).
SPEC_PATH = Path(__file__).parents[2] / "gateway" / "spec" / "hypeman-openapi.yaml"

# schema name -> (our Struct, spec properties deliberately not modelled)
MODELS: dict[str, tuple[type[msgspec.Struct], frozenset[str]]] = {
    "Error": (api.Error, frozenset({"details", "inner_error"})),
    "VolumeMount": (api.VolumeMount, frozenset()),
    "PortMapping": (api.PortMapping, frozenset()),
    "CreateInstanceRequest": (api.CreateInstanceRequest, frozenset()),
    "Instance": (api.Instance, frozenset()),
    "CreateImageRequest": (api.CreateImageRequest, frozenset()),
    "Image": (api.Image, frozenset()),
    "CreateVolumeRequest": (api.CreateVolumeRequest, frozenset()),
    "VolumeAttachment": (api.VolumeAttachment, frozenset()),
    "Volume": (api.Volume, frozenset()),
    "AttachVolumeRequest": (api.AttachVolumeRequest, frozenset()),
    "Health": (api.Health, frozenset()),
    "GPUConfig": (api.GPUConfig, frozenset()),
    "InstanceGPU": (api.InstanceGPU, frozenset()),
}
# Optional in the spec, but hypeman always sends them (hypeman-api.md §1.2), so we require them.
ALWAYS_SENT = {
    "Instance": frozenset(
        {"size", "hotplug_size", "overlay_size", "vcpus", "network", "has_snapshot", "hypervisor"}
    ),
    "Instance.network": frozenset({"enabled"}),
}
# The two inline objects of the spec, modelled as named Structs.
NESTED: dict[tuple[str, str], type[msgspec.Struct]] = {
    ("CreateInstanceRequest", "network"): api.NetworkRequest,
    ("Instance", "network"): api.InstanceNetwork,
}

# hypeman-api.md §1.2: what the server returns after POST /instances on a networked host.
HYPEMAN_INSTANCE = """
{"created_at":"2026-01-16T10:30:00.51234Z","disk_io_bps":"250.0 MB/s","has_snapshot":false,
 "hotplug_size":"3.0 GB","hypervisor":"cloud-hypervisor","id":"tz4a98xxat96iws9zmbrgj3a",
 "image":"docker.io/library/nginx:alpine","name":"web",
 "network":{"bandwidth_download":"119.2 MB/s","bandwidth_upload":"119.2 MB/s","enabled":true,
            "ip":"10.100.37.201","mac":"02:00:00:5e:a1:0c","name":"default"},
 "overlay_size":"10.0 GB","size":"1024.0 MB","started_at":"2026-01-16T10:30:01.9Z",
 "state":"Running","state_error":null,"stopped_at":null,"vcpus":2}
"""


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    if not SPEC_PATH.is_file():
        pytest.fail(f"hypeman spec not found at {SPEC_PATH}")
    spec = yaml.safe_load(SPEC_PATH.read_text())
    result: dict[str, Any] = spec["components"]["schemas"]
    return result


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        resolved: dict[str, Any] = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return resolved
    return schema


def _example(schema: dict[str, Any], schemas: dict[str, Any], skip: frozenset[str]) -> Any:
    """An instance of ``schema`` built from the spec's own example/enum/default values."""
    schema = _resolve(schema, schemas)
    for key in ("example", "default"):
        if key in schema:
            return schema[key]
    if "enum" in schema:
        return schema["enum"][0]
    kind = str(schema.get("type"))
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _example(v, schemas, frozenset()) for k, v in props.items() if k not in skip}
    if kind == "array":
        return [_example(schema["items"], schemas, frozenset())]
    if schema.get("format") == "date-time":
        return "2025-01-15T10:30:00Z"
    return {"string": "x", "integer": 1, "boolean": True}[kind]


def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {f.encode_name: f for f in msgspec.structs.fields(cls)}


def _check_struct(
    name: str, cls: type[msgspec.Struct], schema: dict[str, Any], skip: frozenset[str]
) -> None:
    """Field names, required set and defaults of ``cls`` follow ``schema``."""
    fields = _fields(cls)
    props = {k: v for k, v in schema.get("properties", {}).items() if k not in skip}
    assert set(props) <= set(fields), f"{name}: missing {set(props) - set(fields)}"
    required = {k for k, f in fields.items() if f.required}
    # A spec-required field must always be sent with a value: required here, or given a
    # concrete default (Health.status = "ok"), never UNSET or None.
    always = required | {
        k for k, f in fields.items() if f.default is not msgspec.UNSET and f.default is not None
    }
    spec_required = set(schema.get("required", []))
    assert spec_required <= always, f"{name}: should require {spec_required - always}"
    extra = required - spec_required - ALWAYS_SENT.get(name, frozenset())
    assert not extra, f"{name}: requires {extra} the spec leaves optional"
    for prop, sub in props.items():
        field = fields[prop]
        if field.required or prop in spec_required:
            continue
        if sub.get("nullable"):
            assert field.default is None, f"{name}.{prop} is nullable: default must be None"
        else:
            # UNSET means "left out"; the server then applies the spec's default itself.
            allowed = (msgspec.UNSET, sub.get("default", msgspec.UNSET))
            assert field.default in allowed, f"{name}.{prop}: default {field.default!r}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_struct_matches_spec(name: str, schemas: dict[str, Any]) -> None:
    cls, skip = MODELS[name]
    _check_struct(name, cls, schemas[name], skip)


@pytest.mark.parametrize(("parent", "prop"), sorted(NESTED))
def test_nested_objects_match_spec(parent: str, prop: str, schemas: dict[str, Any]) -> None:
    schema = schemas[parent]["properties"][prop]
    _check_struct(f"{parent}.{prop}", NESTED[parent, prop], schema, frozenset())


def test_instance_state_enum_matches_spec(schemas: dict[str, Any]) -> None:
    # hypeman's description predates the newer SDK's Initializing (vmfleet serves it).
    newer = {api.InstanceState.INITIALIZING}
    assert [s.value for s in api.InstanceState if s not in newer] == schemas["InstanceState"][
        "enum"
    ]
    assert [h.value for h in api.Hypervisor] == schemas["Instance"]["properties"]["hypervisor"][
        "enum"
    ]
    assert [s.value for s in api.ImageStatus] == schemas["Image"]["properties"]["status"]["enum"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spec_examples_round_trip(name: str, schemas: dict[str, Any]) -> None:
    cls, skip = MODELS[name]
    example = _example(schemas[name], schemas, skip)
    decoded = msgspec.json.decode(msgspec.json.encode(example), type=cls)
    assert json.loads(codec.encode(decoded)) == example


def test_hypeman_instance_example_round_trips_with_nulls() -> None:
    original = json.loads(HYPEMAN_INSTANCE)
    instance = codec.decode_instance(HYPEMAN_INSTANCE.encode())
    assert instance.state is api.InstanceState.RUNNING
    again = json.loads(codec.encode(instance))
    assert list(again) == sorted(original)  # same keys, in hypeman's (alphabetical) order
    assert again["state_error"] is None and again["stopped_at"] is None
    assert again["network"] == original["network"]
    for key, value in original.items():
        if key.endswith("_at") and value is not None:
            assert datetime.fromisoformat(again[key]) == datetime.fromisoformat(value)
        else:
            assert again[key] == value, key


def test_nullable_fields_are_always_sent() -> None:
    image = api.Image(
        name="docker.io/library/alpine:latest",
        digest="sha256:00",
        status=api.ImageStatus.PENDING,
        created_at=datetime.fromisoformat("2025-01-15T10:00:00+00:00"),
    )
    assert json.loads(codec.encode(image)) == {
        "cmd": None,
        "created_at": "2025-01-15T10:00:00Z",
        "digest": "sha256:00",
        "entrypoint": None,
        "error": None,
        "name": "docker.io/library/alpine:latest",
        "queue_position": None,
        "size_bytes": None,
        "status": "pending",
        "working_dir": None,
    }


def test_volume_leaves_out_empty_attachments() -> None:
    volume = api.Volume(
        id="v1", name="data", size_gb=1, created_at=datetime.fromisoformat("2025-01-15T09:00:00Z")
    )
    assert "attachments" not in json.loads(codec.encode(volume))


def test_health_and_error_bodies() -> None:
    assert codec.encode(api.Health()) == b'{"status":"ok"}'
    error = api.Error(code="not_found", message="resource not found")
    assert codec.encode(error) == b'{"code":"not_found","message":"resource not found"}'
    assert codec.decode_error(codec.encode(error)) == error


def test_create_request_tolerates_unknown_fields() -> None:
    body = {
        "name": "web",
        "image": "nginx",
        "tags": {"team": "a"},
        "ttl": "1h",
        "network": {"enabled": False, "egress": {"enabled": True}},
        "cmd": ["sleep", "1"],
        "port_mappings": [{"host_port": 8080, "guest_port": 80}],
    }
    req = codec.decode_create_instance_request(json.dumps(body).encode())
    assert req.name == "web"
    assert isinstance(req.network, api.NetworkRequest) and req.network.enabled is False
    assert req.cmd == ["sleep", "1"]
    assert req.port_mappings == [api.PortMapping(host_port=8080, guest_port=80, protocol="tcp")]
    assert req.size is msgspec.UNSET and req.vcpus is msgspec.UNSET


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"name": "Web", "image": "x"}, "$.name"),
        ({"name": "-web", "image": "x"}, "$.name"),
        ({"name": "web-", "image": "x"}, "$.name"),
        ({"name": "we_b", "image": "x"}, "$.name"),
        ({"name": "a" * 64, "image": "x"}, "$.name"),
        ({"name": 5, "image": "x"}, "$.name"),
        ({"name": "web"}, "`image`"),
        ({"name": "web", "image": "x", "vcpus": -1}, "$.vcpus"),
        ({"name": "web", "image": "x", "vcpus": "2"}, "$.vcpus"),
        ({"name": "web", "image": "x", "hypervisor": "firecracker"}, "$.hypervisor"),
        ({"name": "web", "image": "x", "size": None}, "$.size"),
        ({"name": "web", "image": "x", "env": {"A": 1}}, "$.env"),
        ({"name": "web", "image": "x", "volumes": [{"volume_id": "v"}]}, "`mount_path`"),
        (
            {"name": "web", "image": "x", "port_mappings": [{"host_port": 0, "guest_port": 1}]},
            "$.port_mappings[0].host_port",
        ),
        (
            {
                "name": "web",
                "image": "x",
                "port_mappings": [{"host_port": 1, "guest_port": 1, "protocol": "sctp"}],
            },
            "$.port_mappings[0].protocol",
        ),
    ],
)
def test_create_request_rejects_with_field_in_message(body: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        codec.decode_create_instance_request(json.dumps(body).encode())
    assert where in str(info.value)


def test_create_request_accepts_longest_name_and_zero_vcpus() -> None:
    body = {"name": "a" * 63, "image": "x", "vcpus": 0}
    assert codec.decode_create_instance_request(json.dumps(body).encode()).vcpus == 0


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"name": "d", "size_gb": 0}, "$.size_gb"),
        ({"name": "d", "size_gb": 1, "id": "../etc"}, "$.id"),
        ({"name": "d", "size_gb": 1, "id": "a.b"}, "$.id"),
        ({"size_gb": 1}, "`name`"),
    ],
)
def test_create_volume_request_validation(body: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        codec.decode_create_volume_request(json.dumps(body).encode())
    assert where in str(info.value)


def test_small_request_bodies() -> None:
    vol = codec.decode_create_volume_request(b'{"name":"d","size_gb":10,"id":"vol-data-1","x":1}')
    assert (vol.id, vol.size_gb) == ("vol-data-1", 10)
    attach = codec.decode_attach_volume_request(b'{"mount_path":"/mnt/data"}')
    assert attach.readonly is False
    assert codec.decode_create_image_request(b'{"name":"nginx"}').name == "nginx"


def test_naive_timestamps_rejected_on_decode() -> None:
    with pytest.raises(msgspec.ValidationError, match="created_at"):
        codec.decode_volume(b'{"id":"v","name":"n","size_gb":1,"created_at":"2025-01-15T09:00:00"}')
