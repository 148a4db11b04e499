"""Moving a Standby instance to another host (``POST /hosts/{id}/drain`` with ``move``).

Three commands, in an order that keeps exactly one owner at every moment (the record's
``host``): the old host sends the instance's files to the transfers store and refuses
any other command on it; the new host, chosen by placement as for a create (the old host
left out), fetches and verifies them and writes the record naming itself; only then does
the old host delete its copy. An import that fails gives the instance back to the old
host as it was. worker/transfer/move.py is the worker's side.
"""

from __future__ import annotations

import secrets
import time

from gateway.placement import Demand
from gateway.service import Gateway
from gateway.view import FleetView
from schemas.api import Hypervisor, InstanceState
from schemas.clock import utc_now
from schemas.errors import Conflict, HostUnavailable, InvalidState, VmfleetError
from schemas.messages import (
    ExportInstance,
    FetchSnapshot,
    FinishMove,
    ImportInstance,
    InstanceRecord,
    PublishSnapshot,
    host_port_key,
)
from schemas.snapshots import SnapshotRecord
from schemas.transfers import snapshot_bundle, volumes_attached

__all__ = ["fork_host", "move_instance"]

#: Moving a guest's memory and disks takes longer than a lifecycle command.
MOVE_STEP_TIMEOUT_S = 900.0


def _demand(record: InstanceRecord) -> Demand:
    return Demand(
        vcpus=record.vcpus,
        memory_bytes=record.size_bytes + record.hotplug_bytes,
        hypervisor=record.hypervisor,
        disk_bytes=record.overlay_bytes,
        ports=frozenset(host_port_key(m.host_port, m.protocol) for m in record.port_mappings),
    )


def _command_id(step: str, instance_id: str) -> str:
    return f"move-{step}-{instance_id}-{secrets.token_hex(4)}"


async def move_instance(gw: Gateway, record: InstanceRecord) -> tuple[str, float]:
    """Move the Standby instance of ``record`` off its host; returns the host it lives on
    now and the seconds the move took."""
    if record.state is not InstanceState.STANDBY:
        raise InvalidState(
            f"instance {record.id} is {record.state.value}: only a Standby instance can move"
        )
    if record.volumes:  # refused before a host is picked for it
        volume_ids = [m.volume_id for m in record.volumes]
        raise Conflict(
            volumes_attached(record.id, volume_ids, record.host), code="volumes_attached"
        )
    started = time.monotonic()
    source = record.host
    demand = _demand(record)
    target = gw.placement.instance_host(demand, exclude=frozenset({source}))
    bundle = f"move-{record.id}-{secrets.token_hex(4)}"
    exported = await gw.execute(
        source,
        ExportInstance(
            id=_command_id("export", record.id),
            issued_at=utc_now(),
            instance_id=record.id,
            bundle=bundle,
        ),
        timeout_s=MOVE_STEP_TIMEOUT_S,
    )
    sent = exported.instance or record
    try:
        with gw.placement.reserved(target, demand):
            await gw.execute(
                target,
                ImportInstance(
                    id=_command_id("import", record.id),
                    issued_at=utc_now(),
                    instance_id=record.id,
                    bundle=bundle,
                    record=sent,
                ),
                settled=lambda: _lives_on(gw, record.id, target),
                timeout_s=MOVE_STEP_TIMEOUT_S,
            )
    except VmfleetError:
        await _finish(gw, source, record.id, bundle, moved=False)
        raise
    await _finish(gw, source, record.id, bundle, moved=True)
    return target, time.monotonic() - started


def _lives_on(gw: Gateway, instance_id: str, host: str) -> bool:
    found = gw.view.instances.get(instance_id)
    return found is not None and found.host == host


async def _finish(gw: Gateway, source: str, instance_id: str, bundle: str, *, moved: bool) -> None:
    await gw.execute(
        source,
        FinishMove(
            id=_command_id("finish", instance_id),
            issued_at=utc_now(),
            instance_id=instance_id,
            bundle=bundle,
            moved=moved,
        ),
    )


async def fork_host(gw: Gateway, snapshot: SnapshotRecord) -> str:
    """The host a fork of ``snapshot`` runs on, chosen by placement with the snapshot's
    hosts preferred; a host without it first gets it through the transfers store (sent
    once by a host that has it, fetched once per host)."""
    source = snapshot.source
    demand = Demand(
        vcpus=source.vcpus,
        memory_bytes=source.size_bytes + source.hotplug_bytes,
        hypervisor=Hypervisor(snapshot.hypervisor),
        disk_bytes=source.overlay_bytes,
    )
    target = gw.placement.instance_host(demand, prefer=frozenset(snapshot.hosts))
    holder = _live_holder(gw.view, snapshot)
    if target == holder:
        return target
    bundle = snapshot_bundle(snapshot.id)
    await gw.execute(
        holder,
        PublishSnapshot(
            id=_command_id("publish", snapshot.id),
            issued_at=utc_now(),
            snapshot_id=snapshot.id,
            bundle=bundle,
        ),
        timeout_s=MOVE_STEP_TIMEOUT_S,
    )
    await gw.execute(
        target,
        FetchSnapshot(
            id=_command_id("fetch", snapshot.id),
            issued_at=utc_now(),
            snapshot_id=snapshot.id,
            bundle=bundle,
        ),
        timeout_s=MOVE_STEP_TIMEOUT_S,
    )
    return target


def _live_holder(view: FleetView, snapshot: SnapshotRecord) -> str:
    """The first live host holding the snapshot (the one that took it, while it lives)."""
    for host in snapshot.hosts:
        if view.live_host(host) is not None:
            return host
    raise HostUnavailable(
        f"snapshot {snapshot.id} is on {', '.join(snapshot.hosts) or 'no host'}, "
        "and none of them is live"
    )
