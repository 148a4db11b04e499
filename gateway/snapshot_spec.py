"""The served description of snapshots, forks and snapshot schedules (hypeman 0.28's,
newer than the vendored document): schemas generated from ``schemas.snapshots``, and the
operations as vmfleet serves them (``gateway/routes/snapshots.py``)."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from schemas.snapshots import (
    CreateSnapshotRequest,
    ForkInstanceRequest,
    ForkSnapshotRequest,
    RestoreSnapshotRequest,
    Snapshot,
    SnapshotSchedule,
    SnapshotScheduleRequest,
)

__all__ = ["SNAPSHOT_OPERATIONS", "add_snapshots"]

_EXTENSION: Final = "x-vmfleet-extension"
_SECURED: Final[list[dict[str, list[str]]]] = [{"bearerAuth": []}]

#: hypeman's operations on snapshots (path -> methods).
SNAPSHOT_OPERATIONS: Final[dict[str, frozenset[str]]] = {
    "/snapshots": frozenset({"get"}),
    "/snapshots/{snapshot_id}": frozenset({"get", "delete"}),
    "/snapshots/{snapshot_id}/fork": frozenset({"post"}),
    "/instances/{id}/snapshots": frozenset({"post"}),
    "/instances/{id}/snapshots/{snapshot_id}/restore": frozenset({"post"}),
    "/instances/{id}/fork": frozenset({"post"}),
    "/instances/{id}/snapshot-schedule": frozenset({"get", "put", "delete"}),
}

_FLEET: Final = {
    "503": "No live host holds it, the host has no room (host_full), or it is not answering",
    "504": "The host did not answer in time; the command stays queued",
}


def add_snapshots(schemas: dict[str, Any], paths: dict[str, Any]) -> None:
    _, generated = msgspec.json.schema_components(
        [
            Snapshot,
            CreateSnapshotRequest,
            ForkInstanceRequest,
            ForkSnapshotRequest,
            RestoreSnapshotRequest,
            SnapshotSchedule,
            SnapshotScheduleRequest,
        ],
        ref_template="#/components/schemas/{name}",
    )
    for name, schema in generated.items():
        schemas.setdefault(name, schema)
    schemas["Snapshot"]["properties"]["hosts"][_EXTENSION] = True
    paths.update(_paths())


def _paths() -> dict[str, Any]:
    snapshot_id = _param("snapshot_id", "Snapshot ID")
    instance_id = _param("id", "Instance ID, name or unique ID prefix")
    return {
        "/snapshots": {"get": _list()},
        "/snapshots/{snapshot_id}": {
            "get": _op(
                "getSnapshot",
                "A snapshot",
                [snapshot_id],
                _json("The snapshot", _ref("Snapshot")),
                {"404": "Snapshot not found"},
            ),
            "delete": _op(
                "deleteSnapshot",
                "Delete a snapshot on every host holding it (forks keep what they use)",
                [snapshot_id],
                {"description": "Deleted"},
                {"404": "Snapshot not found", **_FLEET},
                status="204",
            ),
        },
        "/snapshots/{snapshot_id}/fork": {
            "post": _op(
                "forkSnapshot",
                "A new instance from a snapshot (its own id, name, MAC, IP and hostname)",
                [snapshot_id],
                _json("The new instance", _ref("Instance")),
                {
                    "400": "Bad request, or the name is taken (name_conflict)",
                    "404": "Snapshot not found",
                    "409": "The host's VMM or kernel is not the snapshot's "
                    "(snapshot_incompatible), or the snapshot had volumes (not_supported)",
                    "507": "The host's disk is full (nothing is kept)",
                    **_FLEET,
                },
                body="ForkSnapshotRequest",
                status="201",
            )
        },
        "/instances/{id}/snapshots": {
            "post": _op(
                "createInstanceSnapshot",
                "Snapshot an instance: Standby = memory + disks (a Running instance is "
                "paused only for the copy and keeps running), Stopped = disks only",
                [instance_id],
                _json("The snapshot", _ref("Snapshot")),
                {
                    "400": "Bad request",
                    "404": "Instance not found",
                    "409": "The instance's state allows no snapshot of this kind, or its "
                    "name is taken among the instance's snapshots",
                    "507": "The host's disk is full (nothing is kept)",
                    **_FLEET,
                },
                body="CreateSnapshotRequest",
                status="201",
            )
        },
        "/instances/{id}/snapshots/{snapshot_id}/restore": {
            "post": _op(
                "restoreInstanceSnapshot",
                "Put an instance back to a snapshot of it, in place",
                [instance_id, snapshot_id],
                _json("The instance", _ref("Instance")),
                {
                    "400": "Bad request",
                    "404": "Instance or snapshot not found",
                    "409": "Not a snapshot of this instance, or not restorable here",
                    "507": "The host's disk is full",
                    **_FLEET,
                },
                body="RestoreSnapshotRequest",
                body_required=False,
            )
        },
        "/instances/{id}/fork": {
            "post": _op(
                "forkInstance",
                "A new instance from this one's current state (a snapshot taken, forked "
                "and deleted again)",
                [instance_id],
                _json("The new instance", _ref("Instance")),
                {
                    "400": "Bad request, or the name is taken (name_conflict)",
                    "404": "Instance not found",
                    "409": "The instance cannot be forked in its state (a Running one needs "
                    "from_running)",
                    "507": "The host's disk is full (nothing is kept)",
                    **_FLEET,
                },
                body="ForkInstanceRequest",
                status="201",
            )
        },
        "/instances/{id}/snapshot-schedule": {
            "get": _op(
                "getSnapshotSchedule",
                "The instance's snapshot schedule",
                [instance_id],
                _json("The schedule", _ref("SnapshotSchedule")),
                {"404": "Instance not found, or it has no schedule"},
            ),
            "put": _op(
                "setSnapshotSchedule",
                "Set the instance's snapshot schedule (interval at least 1m; retention "
                "max_count and/or max_age); its host takes the snapshots and deletes the "
                "scheduled ones retention no longer keeps",
                [instance_id],
                _json("The schedule", _ref("SnapshotSchedule")),
                {"400": "Bad request", "404": "Instance not found", **_FLEET},
                body="SnapshotScheduleRequest",
            ),
            "delete": _op(
                "deleteSnapshotSchedule",
                "Remove the instance's snapshot schedule (its snapshots stay)",
                [instance_id],
                {"description": "Removed"},
                {"404": "Instance not found, or it has no schedule", **_FLEET},
                status="204",
            ),
        },
    }


def _list() -> dict[str, Any]:
    query = [
        _query("kind", {"type": "string", "enum": ["Standby", "Stopped"]}, "Filter by kind"),
        _query("name", {"type": "string"}, "Filter by snapshot name"),
        _query("source_instance_id", {"type": "string"}, "Filter by source instance ID"),
        {
            "name": "tags",
            "in": "query",
            "style": "deepObject",
            "explode": True,
            "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            "description": "Filter by tags: every pair must match",
        },
    ]
    return _op(
        "listSnapshots",
        "Snapshots of the fleet",
        query,
        _json("Snapshots, oldest first", {"type": "array", "items": _ref("Snapshot")}),
        {"400": "Bad filter"},
    )


def _op(
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    success: dict[str, Any],
    errors: dict[str, str],
    *,
    body: str | None = None,
    body_required: bool = True,
    status: str = "200",
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "security": _SECURED,
        "parameters": parameters,
        "responses": {
            status: success,
            **{
                code: _error(text, code in _FLEET or code == "507") for code, text in errors.items()
            },
        },
    }
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, fleet: bool) -> dict[str, Any]:
    response = _json(description, _ref("Error"))
    if fleet:
        response[_EXTENSION] = True
    return response
