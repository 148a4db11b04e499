"""The API description vmfleet serves at ``/spec.yaml`` and ``/spec.json``.

It is hypeman's vendored ``spec/hypeman-openapi.yaml`` cut down to the operations vmfleet
implements, plus vmfleet's extensions, each marked ``x-vmfleet-extension: true``:
``GET /hosts``, ``GET /events``, ``GET /instances/{id}/wait``, the exec and cp
WebSockets (hypeman's, but missing from its document), the newer SDK's
``POST /volumes/from-archive``, the ``host`` and
``port_mappings`` fields, the 503/504 answers of a fleet, the 507 of a host whose disk is
full, ``GET /ready``, and the meta routes.
Schemas of the extensions are generated from the msgspec Structs in ``schemas/``, and a
test checks hypeman's component schemas against the Structs too, so the description and
the code cannot drift apart. Another test checks that the routes the app serves and the
paths described here are the same set.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Final

import msgspec
import yaml

from gateway.snapshot_spec import SNAPSHOT_OPERATIONS, add_snapshots
from schemas.api import (
    VOLUME_ID_PATTERN,
    Capabilities,
    DrainRequest,
    DrainResult,
    HostResources,
    InstanceState,
    InstanceStats,
    Readiness,
    UpdateInstanceRequest,
    WaitForStateResponse,
)
from schemas.autostandby import AutoStandbyPolicy, AutoStandbyStatus
from schemas.messages import HostRecord, StateEvent

__all__ = ["EXTENSION", "HYPEMAN_OPERATIONS", "build_spec", "spec_json", "spec_yaml"]

EXTENSION: Final = "x-vmfleet-extension"
VENDORED: Final = Path(__file__).parent / "spec" / "hypeman-openapi.yaml"

#: hypeman's operations that vmfleet serves (path → methods).
HYPEMAN_OPERATIONS: Final[dict[str, frozenset[str]]] = {
    "/health": frozenset({"get"}),
    "/images": frozenset({"get", "post"}),
    "/images/{name}": frozenset({"get", "delete"}),
    "/instances": frozenset({"get", "post"}),
    "/instances/{id}": frozenset({"get", "delete", "patch"}),
    "/resources": frozenset({"get"}),
    # The newer SDK's (hypeman 0.28), described here because the vendored document
    # predates them.
    "/instances/{id}/stats": frozenset({"get"}),
    "/instances/{id}/auto-standby/status": frozenset({"get"}),
    "/instances/{id}/auto-standby/hold": frozenset({"post"}),
    "/capabilities": frozenset({"get"}),
    "/instances/{id}/standby": frozenset({"post"}),
    "/instances/{id}/restore": frozenset({"post"}),
    "/instances/{id}/stop": frozenset({"post"}),
    "/instances/{id}/start": frozenset({"post"}),
    "/instances/{id}/logs": frozenset({"get"}),
    "/instances/{id}/stat": frozenset({"get"}),
    "/instances/{id}/volumes/{volumeId}": frozenset({"post", "delete"}),
    "/volumes": frozenset({"get", "post"}),
    "/volumes/{id}": frozenset({"get", "delete"}),
    **SNAPSHOT_OPERATIONS,
}
_FLEET_ERRORS: Final = {
    "503": "No live host can take it, or its host is not live (nothing was sent)",
    "504": "The host did not answer in time; the command stays queued",
}
#: A write that stores something on a host's disk can find that disk full.
_INSUFFICIENT_STORAGE: Final = "The host's disk is full (nothing of the operation is kept)"
_DISK_WRITES: Final = (
    ("/instances", "post"),
    ("/instances/{id}/standby", "post"),
    ("/instances/{id}/restore", "post"),
    ("/instances/{id}/start", "post"),
    ("/instances/{id}/volumes/{volumeId}", "post"),
    ("/volumes", "post"),
    ("/volumes/from-archive", "post"),
    ("/images", "post"),
)
_WRITES: Final = (
    ("/instances", "post"),
    ("/instances/{id}", "delete"),
    ("/instances/{id}/standby", "post"),
    ("/instances/{id}/restore", "post"),
    ("/instances/{id}/stop", "post"),
    ("/instances/{id}/start", "post"),
    ("/instances/{id}/volumes/{volumeId}", "post"),
    ("/instances/{id}/volumes/{volumeId}", "delete"),
    ("/volumes", "post"),
    ("/volumes/from-archive", "post"),
    ("/volumes/{id}", "delete"),
    ("/images", "post"),
)


def build_spec() -> dict[str, Any]:
    """The served description, as a dictionary."""
    spec: dict[str, Any] = yaml.safe_load(VENDORED.read_text())
    spec["info"]["title"] = "vmfleet API (hypeman-compatible)"
    spec["info"]["description"] = (
        "hypeman's API served by a fleet of hosts. Operations and fields marked "
        f"`{EXTENSION}: true` are vmfleet's additions."
    )
    spec["paths"] = {
        path: {m: op for m, op in ops.items() if m in HYPEMAN_OPERATIONS[path] or m == "parameters"}
        for path, ops in spec["paths"].items()
        if path in HYPEMAN_OPERATIONS
    }
    for operations in spec["paths"].values():
        for method, operation in operations.items():
            if method != "parameters":
                operation["responses"] = {str(k): v for k, v in operation["responses"].items()}
    _extend_schemas(spec["components"]["schemas"])
    _add_supervision(spec["components"]["schemas"], spec["paths"])
    add_snapshots(spec["components"]["schemas"], spec["paths"])
    spec["paths"].update(_extension_paths())
    _add_fleet_errors(spec["paths"])
    _drop_unused_schemas(spec)
    return spec


def spec_yaml(spec: dict[str, Any]) -> bytes:
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).encode()


def spec_json(spec: dict[str, Any]) -> bytes:
    return json.dumps(spec, ensure_ascii=False).encode()


# -- changes to hypeman's description ----------------------------------------------------------


def _extend_schemas(schemas: dict[str, Any]) -> None:
    instance = schemas["Instance"]["properties"]
    instance["host"] = _ext({"type": "string", "description": "The host running the instance"})
    instance["port_mappings"] = _ext(
        {"type": "array", "items": {"$ref": "#/components/schemas/PortMapping"}}
    )
    create = schemas["CreateInstanceRequest"]["properties"]
    create["port_mappings"] = _ext(
        {"type": "array", "items": {"$ref": "#/components/schemas/PortMapping"}}
    )
    for field in ("cmd", "entrypoint"):
        create[field] = _ext(
            {
                "type": "array",
                "items": {"type": "string"},
                "description": f"Overrides the image's {field}",
            }
        )
    create["host"] = _ext(
        {"type": "string", "description": "Placement constraint: run on this host"}
    )
    create["host_labels"] = _ext(
        {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Placement constraint: labels the host must advertise",
        }
    )
    # The newer SDK's Initializing is a state vmfleet reports (the VM runs, the guest is
    # not ready yet); the vendored description predates it.
    schemas["InstanceState"]["enum"] = [s.value for s in InstanceState]
    schemas["InstanceState"]["description"] += (
        "- Initializing: VM is running while guest init is still in progress\n"
    )
    _, generated = msgspec.json.schema_components(
        [HostRecord, StateEvent, WaitForStateResponse, DrainRequest, DrainResult, Readiness],
        ref_template="#/components/schemas/{name}",
    )
    for name, schema in generated.items():
        schemas.setdefault(name, _ext(schema))


# -- the newer SDK's supervision and usage surface (hypeman 0.28) ------------------------


def _add_supervision(schemas: dict[str, Any], paths: dict[str, Any]) -> None:
    """Tags, expiry, PATCH, stats and capabilities, which the newer SDK has and the
    vendored description predates; the policies this build refuses are described as such."""
    _, generated = msgspec.json.schema_components(
        [
            InstanceStats,
            Capabilities,
            UpdateInstanceRequest,
            HostResources,
            AutoStandbyPolicy,
            AutoStandbyStatus,
        ],
        ref_template="#/components/schemas/{name}",
    )
    for name, schema in generated.items():
        if name not in schemas:
            schemas[name] = schema
    _lifetime_fields(schemas)
    _resources_fields(schemas)
    paths["/instances/{id}"]["patch"] = _update_operation()
    paths["/instances/{id}/stats"] = {"get": _stats_operation()}
    paths["/instances/{id}/auto-standby/status"] = {"get": _auto_standby_status_operation()}
    paths["/instances/{id}/auto-standby/hold"] = {"post": _auto_standby_hold_operation()}
    paths["/capabilities"] = {"get": _capabilities_operation()}


_TAGS: Final = {
    "type": "object",
    "additionalProperties": {"type": "string", "maxLength": 255},
    "maxProperties": 50,
    "description": "User-defined key-value tags (keys: letters, digits, '.', '_', ':', "
    "'/', '-'; at most 63 characters)",
}
_TTL: Final = {
    "type": "string",
    "description": 'Lifetime in Go duration format ("1h"); "0s" disables expiry. '
    "Mutually exclusive with expires_at.",
}
_EXPIRES_AT: Final = {
    "type": "string",
    "format": "date-time",
    "description": "Absolute expiration time; must be in the future. Mutually exclusive with ttl.",
}
_AUTO_STANDBY_DESCRIPTION: Final = (
    "Standby after idle_timeout without inbound TCP connections (ignored ports and source "
    "CIDRs do not count). idle_timeout is required when enabled and echoed as Go prints "
    'it ("10m0s"); '
    "CIDRs are canonicalized, sorted and deduplicated, ports sorted and deduplicated (0 is "
    "refused); a disabled policy is stored as {enabled: false}. Invalid values are 400 "
    "invalid_auto_standby."
)


_RESTART_POLICY: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Whole-instance restart supervision. Invalid values are 400 "
    'invalid_restart_policy; durations are echoed as Go prints them ("10m0s").',
    "properties": {
        "policy": {"type": "string", "enum": ["never", "always", "on_failure"]},
        "backoff": {"type": "string", "description": "Delay before each attempt (default 5s)"},
        "max_attempts": {"type": "integer", "minimum": 0, "description": "0: unlimited"},
        "stable_after": {
            "type": "string",
            "description": "Running this long resets the attempts (default 10m)",
        },
    },
}
_RESTART_STATUS: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "attempts": {"type": "integer"},
        "blocked_reason": {"type": "string", "enum": ["manual_stop", "max_attempts_exceeded"]},
        "last_attempt_at": {"type": "string", "format": "date-time"},
        "next_attempt_at": {"type": "string", "format": "date-time"},
        "last_reason": {"type": "string", "enum": ["health_check_failed"]},
    },
}


_DURATION: Final = {"type": "string", "description": "A Go duration"}
_HEALTH_CHECK: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Workload health check. `type` is inferred from the single probe object "
    "when left out (none given: no check). http and tcp need network.enabled; in the user "
    "network mode they are probed through the instance's port_mapping of that guest port, "
    "which must exist. Invalid values are 400 invalid_health_check naming the field.",
    "properties": {
        "type": {"type": "string", "enum": ["none", "http", "tcp", "exec"]},
        "http": {
            "type": "object",
            "required": ["port"],
            "properties": {
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "path": {"type": "string", "description": "Starts with / (default /)"},
                "scheme": {"type": "string", "enum": ["http", "https"]},
                "expected_status": {"type": "integer", "description": "Default 200"},
            },
        },
        "tcp": {
            "type": "object",
            "required": ["port"],
            "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}},
        },
        "exec": {
            "type": "object",
            "required": ["command"],
            "description": "Run through the guest agent; exit 0 is healthy",
            "properties": {
                "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "working_dir": {"type": "string"},
            },
        },
        "interval": {**_DURATION, "description": "Between checks (default 10s)"},
        "timeout": {**_DURATION, "description": "Per check, at most interval (default 2s)"},
        "start_period": {
            **_DURATION,
            "description": "Failures this soon after a start, restore or check update never "
            "make the instance unhealthy (default 30s)",
        },
        "failure_threshold": {"type": "integer", "minimum": 1, "description": "Default 3"},
        "success_threshold": {"type": "integer", "minimum": 1, "description": "Default 1"},
    },
}
_HEALTH_STATUS: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Left out when the instance has no health check. unknown: neither "
    "Running nor Initializing; starting: Initializing, or no threshold met yet.",
    "required": ["status", "consecutive_failures", "consecutive_successes"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["disabled", "starting", "healthy", "unhealthy", "unknown"],
        },
        "consecutive_failures": {"type": "integer"},
        "consecutive_successes": {"type": "integer"},
        "last_checked_at": {"type": "string", "format": "date-time"},
        "last_success_at": {"type": "string", "format": "date-time"},
        "last_failure_at": {"type": "string", "format": "date-time"},
        "last_error": {"type": "string", "maxLength": 512},
    },
}


def _lifetime_fields(schemas: dict[str, Any]) -> None:
    create = schemas["CreateInstanceRequest"]["properties"]
    create["tags"] = copy.deepcopy(_TAGS)
    create["ttl"] = copy.deepcopy(_TTL)
    create["expires_at"] = copy.deepcopy(_EXPIRES_AT)
    update = schemas["UpdateInstanceRequest"]["properties"]
    update["ttl"] = copy.deepcopy(_TTL)
    update["expires_at"] = copy.deepcopy(_EXPIRES_AT)
    update["env"] = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "Only keys bound to a credential's source.env; vmfleet has none, so "
        "a non-empty env is refused (400 invalid_env).",
    }
    schemas["AutoStandbyPolicy"]["description"] = _AUTO_STANDBY_DESCRIPTION
    create["auto_standby"] = _ref("AutoStandbyPolicy")
    update["auto_standby"] = _ref("AutoStandbyPolicy")
    schemas["HealthCheck"] = copy.deepcopy(_HEALTH_CHECK)
    schemas["InstanceHealthStatus"] = copy.deepcopy(_HEALTH_STATUS)
    create["health_check"] = _ref("HealthCheck")
    update["health_check"] = _ref("HealthCheck")
    schemas["RestartPolicy"] = copy.deepcopy(_RESTART_POLICY)
    schemas["RestartStatus"] = copy.deepcopy(_RESTART_STATUS)
    create["restart_policy"] = _ref("RestartPolicy")
    update["restart_policy"] = _ref("RestartPolicy")
    instance = schemas["Instance"]["properties"]
    instance["restart_policy"] = _ref("RestartPolicy")
    instance["restart_status"] = _ref("RestartStatus")
    instance["auto_standby"] = _ref("AutoStandbyPolicy")
    instance["health_check"] = _ref("HealthCheck")
    instance["current_phase"] = {
        "type": "string",
        "description": "The lowercase state the instance is in (running, stopped, ...)",
    }
    instance["current_phase_since"] = {
        "type": "string",
        "format": "date-time",
        "description": "When the instance entered current_phase",
    }
    instance["phase_durations_ms"] = {
        "type": "object",
        "additionalProperties": {"type": "integer", "format": "int64"},
        "description": "Milliseconds spent in each lowercase state since creation, the "
        "current phase up to the response time",
    }
    instance["health_status"] = _ref("InstanceHealthStatus")
    instance["exit_code"] = {
        "type": "integer",
        "description": "The app's exit code once it ended (128+N: killed by signal N); left "
        "out until then and cleared by the next start.",
    }
    instance["exit_message"] = {
        "type": "string",
        "description": 'How the app ended, e.g. "success", "exit code 3", "killed by signal '
        '9 (killed) - OOM".',
    }
    instance["tags"] = {"type": "object", "additionalProperties": {"type": "string"}}
    instance["expires_at"] = {
        "type": "string",
        "format": "date-time",
        "description": "When the instance is deleted on its own; left out when it never is.",
    }


def _resources_fields(schemas: dict[str, Any]) -> None:
    resources = schemas["Resources"]["properties"]
    for unserved in ("disk_breakdown", "gpu"):
        resources.pop(unserved, None)
    resources["hosts"] = _ext(
        {"type": "array", "items": _ref("HostResources"), "description": "Each live host's part"}
    )
    schemas["Resources"]["required"] = [*schemas["Resources"]["required"], "hosts"]
    allocation = schemas["ResourceAllocation"]["properties"]
    allocation["disk_io_bps"] = {"type": "integer", "format": "int64"}
    allocation["host"] = _ext({"type": "string", "description": "The host running it"})
    schemas["HostResources"] = _ext(schemas["HostResources"])


def _update_operation() -> dict[str, Any]:
    return {
        "summary": "Update an instance without restarting it",
        "description": "Changes the expiry (`ttl` counts from when the owning host commits "
        'it; `"0s"` clears it) and the restart policy (replaced whole; the counters start '
        "again unless the instance was stopped by its user). An empty body or an unknown "
        "field is 400; `health_check` replaces the check whole and starts a fresh health "
        "window; `auto_standby` replaces the policy whole (the idle clock keeps running); an "
        "expired instance is 409 `instance_expired`.",
        "operationId": "updateInstance",
        "security": [{"bearerAuth": []}],
        "parameters": [_path_id()],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("UpdateInstanceRequest")}},
        },
        "responses": {
            "200": _json_response("Instance updated", _ref("Instance")),
            "400": _error_response("Bad request"),
            "404": _error_response("Instance not found"),
            "409": _error_response("Instance expired, or ambiguous id"),
            **{status: _ext(_error_response(text)) for status, text in _FLEET_ERRORS.items()},
        },
    }


def _stats_operation() -> dict[str, Any]:
    return {
        "summary": "Resource usage of an instance, read on its host",
        "description": "All zeros while no VMM runs (Stopped, Standby). In the user network "
        "mode the network bytes are 0 (QEMU keeps no counters there).",
        "operationId": "getInstanceStats",
        "security": [{"bearerAuth": []}],
        "parameters": [_path_id()],
        "responses": {
            "200": _json_response("Usage now", _ref("InstanceStats")),
            "404": _error_response("Instance not found"),
            "409": _error_response("Ambiguous instance reference"),
            "503": _ext(_error_response("The instance's host is not live or not answering")),
        },
    }


def _auto_standby_status_operation() -> dict[str, Any]:
    return {
        "summary": "Auto-standby status of an instance, read on its host",
        "description": "Why the instance would or would not go to standby now. Inbound "
        "connections are counted on the owning host: sockets of the mapped host ports in the "
        "user network mode, conntrack flows to the guest's address in bridge mode "
        "(`tracking_mode` says which). An instance without networking is `ineligible` / "
        "`network_disabled`.",
        "operationId": "getAutoStandbyStatus",
        "security": [{"bearerAuth": []}],
        "parameters": [_path_id()],
        "responses": {
            "200": _json_response("Auto-standby status", _ref("AutoStandbyStatus")),
            "404": _error_response("Instance not found"),
            "409": _error_response("Ambiguous instance reference"),
            "503": _ext(_error_response("The instance's host is not live or not answering")),
        },
    }


def _auto_standby_hold_operation() -> dict[str, Any]:
    return {
        "summary": "Hold off auto-standby for one idle_timeout",
        "description": "Sets hold_until to now + idle_timeout (the newest hold wins) and "
        "cancels a standby the policy queued. 409 `instance_in_standby` while the instance "
        "is in Standby or its standby is executing; any other instance (no policy, disabled, "
        "not running) gets 200 with its current status.",
        "operationId": "holdAutoStandby",
        "security": [{"bearerAuth": []}],
        "parameters": [_path_id()],
        "responses": {
            "200": _json_response("Auto-standby status after the hold", _ref("AutoStandbyStatus")),
            "404": _error_response("Instance not found"),
            "409": _error_response("Instance in standby, or ambiguous instance reference"),
            "503": _ext(_error_response("The instance's host is not live or not answering")),
        },
    }


def _capabilities_operation() -> dict[str, Any]:
    return {
        "summary": "What this fleet serves, from its live hosts",
        "operationId": "getCapabilities",
        "security": [{"bearerAuth": []}],
        "responses": {"200": _json_response("Capabilities", _ref("Capabilities"))},
    }


def _path_id() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "Instance ID, name or unique ID prefix",
    }


def _add_fleet_errors(paths: dict[str, Any]) -> None:
    for path, method in _WRITES:
        responses = paths[path][method]["responses"]
        for status, description in _FLEET_ERRORS.items():
            responses.setdefault(status, _ext(_error_response(description)))
    for path, method in _DISK_WRITES:
        responses = paths[path][method]["responses"]
        responses.setdefault("507", _ext(_error_response(_INSUFFICIENT_STORAGE)))


def _extension_paths() -> dict[str, Any]:
    secured: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    return {
        "/hosts": {
            "get": _ext(
                {
                    "summary": "List live hosts and their capacity",
                    "operationId": "listHosts",
                    "security": secured,
                    "responses": {"200": _json_response("Live hosts", _array("HostRecord"))},
                }
            )
        },
        "/hosts/{id}/drain": _drain_operations(secured),
        "/events": {"get": _ext(_events_operation(secured))},
        "/instances/{id}/wait": {"get": _ext(_wait_operation(secured))},
        "/instances/{id}/exec": {"get": _ext(_websocket_operation("exec", secured))},
        "/instances/{id}/cp": {"get": _ext(_websocket_operation("cp", secured))},
        "/volumes/from-archive": {"post": _ext(_from_archive_operation(secured))},
        "/spec.yaml": {
            "get": _meta(
                "getSpecYaml", "This API description (YAML)", "application/vnd.oai.openapi"
            )
        },
        "/spec.json": {
            "get": _meta("getSpecJson", "This API description (JSON)", "application/json")
        },
        "/metrics": {"get": _meta("getMetrics", "Prometheus metrics", "text/plain")},
        "/ready": {"get": _ext(_ready_operation())},
    }


#: hypeman's two WebSocket protocols: served by hypeman and spoken by its SDK's
#: ``hypeman.lib``, but absent from hypeman's OpenAPI document, so described here.
_WEBSOCKETS: Final = {
    "exec": (
        "execInstance",
        "Run a command in the guest (WebSocket)",
        "hypeman's exec protocol, as `hypeman.lib.exec` speaks it. Client: a TEXT frame "
        "with the request (`command`, `tty`, `env`, `cwd`, `timeout`, `wait_for_agent`, "
        '`rows`, `cols`), BINARY stdin, TEXT `{"resize":{"rows":R,"cols":C}}`, and '
        '(vmfleet) TEXT `{"eof":true}` to end stdin. Server: BINARY output frames of at '
        'most 32 KiB, then TEXT `{"exitCode":N}`. Needs the token\'s `exec` scope.',
    ),
    "cp": (
        "copyInstanceFiles",
        "Copy files into or out of the guest (WebSocket)",
        "hypeman's cp protocol, as `hypeman.lib.cp_to_instance` and `cp_from_instance` "
        "speak it: a TEXT request with `direction` `to` (then BINARY data, TEXT "
        '`{"type":"end"}`, answered by a TEXT `result`) or `from` (answered by '
        "`header`, BINARY data and `end` frames); errors are TEXT "
        '`{"type":"error","message":...}`. Needs the token\'s `exec` scope.',
    ),
}


def _websocket_operation(kind: str, secured: list[dict[str, list[str]]]) -> dict[str, Any]:
    operation_id, summary, description = _WEBSOCKETS[kind]
    return {
        "summary": summary,
        "description": description,
        "operationId": operation_id,
        "security": secured,
        "parameters": [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "Instance ID, name or unique ID prefix",
            }
        ],
        "responses": {
            "101": {"description": "Switching to the WebSocket protocol"},
            "400": _error_response("Not a WebSocket upgrade request"),
            "401": _error_response("No or an invalid token"),
            "403": _error_response("The token lacks the exec scope"),
            "404": _error_response("Instance not found"),
            "409": _error_response("Instance not running (invalid_state) or ambiguous id"),
        },
    }


def _ready_operation() -> dict[str, Any]:
    ready = _json_response("A live, undrained host heartbeats", _ref("Readiness"))
    return {
        "summary": "Whether the fleet can take work (a fresh fleet cannot until a worker's "
        "first heartbeat)",
        "operationId": "getReady",
        "responses": {"200": ready, "503": _json_response("No such host yet", _ref("Readiness"))},
    }


def _drain_operations(secured: list[dict[str, list[str]]]) -> dict[str, Any]:
    host = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    result = _json_response("The host's drain state", {"$ref": "#/components/schemas/DrainResult"})
    not_found = _error_response("Host not found (or not drained, for DELETE)")
    body = {
        "required": False,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DrainRequest"}}},
    }
    return {
        "post": _ext(
            {
                "summary": "Drain a host: no new placements; optionally standby its instances "
                "and move Standby ones to other hosts",
                "operationId": "drainHost",
                "security": secured,
                "parameters": host,
                "requestBody": body,
                "responses": {"200": result, "404": not_found},
            }
        ),
        "delete": _ext(
            {
                "summary": "Take a host back into placement",
                "operationId": "undrainHost",
                "security": secured,
                "parameters": host,
                "responses": {"200": result, "404": not_found},
            }
        ),
    }


def _events_operation(secured: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "summary": "Stream state transitions (SSE)",
        "description": (
            "One event per transition: `id:` is its stream sequence, `data:` a StateEvent. "
            "Send `Last-Event-ID` to resume after an event; without it the stream starts "
            "with the next transition."
        ),
        "operationId": "streamEvents",
        "security": secured,
        "parameters": [
            _query("instance", {"type": "string"}, "Instance id, name or id prefix"),
            _query("host", {"type": "string"}, "Host id"),
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
            },
        ],
        "responses": {
            "200": {
                "description": "Event stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            "400": _error_response("Bad parameter"),
        },
    }


def _from_archive_operation(secured: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The newer SDK's upload (``volumes.create_from_archive``)."""
    return {
        "summary": "Create a volume from a tar.gz archive",
        "description": (
            "The body is the archive (at most size_gb GiB); its content must fit in size_gb "
            "GiB (400 archive_too_large otherwise)."
        ),
        "operationId": "createVolumeFromArchive",
        "security": secured,
        "parameters": [
            {"name": "name", "in": "query", "required": True, "schema": {"type": "string"}},
            {
                "name": "size_gb",
                "in": "query",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
            _query("id", {"type": "string", "pattern": VOLUME_ID_PATTERN}, "Custom volume id"),
        ],
        "requestBody": {
            "required": True,
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        },
        "responses": {
            "201": _json_response("Volume created", _ref("Volume")),
            "400": _error_response("Bad parameter or archive"),
            "409": _error_response("A volume with this id exists"),
            "413": _error_response("The archive is larger than size_gb"),
        },
    }


def _wait_operation(secured: list[dict[str, list[str]]]) -> dict[str, Any]:
    states = [s.value for s in InstanceState]
    return {
        "summary": "Wait for an instance to reach a state",
        "description": (
            "Returns when the instance is in `state`, becomes Unknown, or `timeout` "
            "(a Go duration, default 60s, at most 5m) passes."
        ),
        "operationId": "waitForState",
        "security": secured,
        "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "state",
                "in": "query",
                "required": True,
                "schema": {"type": "string", "enum": states},
            },
            _query("timeout", {"type": "string"}, 'Go duration such as "30s"'),
        ],
        "responses": {
            "200": _json_response("The state when the wait ended", _ref("WaitForStateResponse")),
            "400": _error_response("Bad parameter"),
            "404": _error_response("Instance not found"),
            "409": _error_response("Ambiguous instance reference"),
        },
    }


def _drop_unused_schemas(spec: dict[str, Any]) -> None:
    """Leave out component schemas only the operations vmfleet does not serve use (vmfleet's
    own stay: StateEvent describes ``/events`` data, which no ``$ref`` can point at)."""
    schemas = spec["components"]["schemas"]
    used: set[str] = set()
    pending = _refs(spec["paths"])
    while pending:
        name = pending.pop()
        if name not in used and name in schemas:
            used.add(name)
            pending |= _refs(schemas[name])
    spec["components"]["schemas"] = {
        k: v for k, v in schemas.items() if k in used or v.get(EXTENSION)
    }


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = set()
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[-1])
            else:
                found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    return set()


# -- small builders ------------------------------------------------------------------------


def _ext(node: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(node), EXTENSION: True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_response(description: str) -> dict[str, Any]:
    return _json_response(description, _ref("Error"))


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _meta(operation_id: str, summary: str, media_type: str) -> dict[str, Any]:
    """A public route outside hypeman's description (no ``security``)."""
    content = {media_type: {"schema": {"type": "string"}}}
    return _ext(
        {
            "summary": summary,
            "operationId": operation_id,
            "responses": {"200": {"description": summary, "content": content}},
        }
    )
