"""Turning a path's ``{id}`` into a record, as hypeman's resolver does (reference §0.2).

Instances: exact id, then exact name, then a unique id prefix. Volumes: exact id, then
exact name (no prefixes). Several matches are a 409 ``ambiguous``; none a 404
``not_found``, with hypeman's messages. Everything is read from the view.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.view import FleetView
from schemas.errors import Conflict, NotFound
from schemas.messages import InstanceRecord, VolumeRecord

__all__ = ["resolve_instance", "resolve_volume"]

NOT_FOUND = "resource not found"
AMBIGUOUS = "multiple resources match, use full ID"


def resolve_instance(view: FleetView, ref: str) -> InstanceRecord:
    """The instance ``ref`` names: its id, its name, or a prefix of exactly one id."""
    exact = view.instances.get(ref)
    if exact is not None:
        return exact
    named = view.instance_ids_named(ref)
    if named:
        return view.instances[_one(named)]
    if ref:
        prefixed = [key for key in view.instances if key.startswith(ref)]
        if prefixed:
            return view.instances[_one(prefixed)]
    raise NotFound(NOT_FOUND)


def resolve_volume(view: FleetView, ref: str) -> VolumeRecord:
    """The volume ``ref`` names: its id, or the name of exactly one volume."""
    exact = view.volumes.get(ref)
    if exact is not None:
        return exact
    named = [key for key, volume in view.volumes.items() if volume.name == ref]
    if named:
        return view.volumes[_one(named)]
    raise NotFound(NOT_FOUND)


def _one(keys: Iterable[str]) -> str:
    found = list(keys)
    if len(found) > 1:
        raise Conflict(AMBIGUOUS, code="ambiguous")
    return found[0]
