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
from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import InvalidState, VmfleetError
from schemas.messages import (
    ExportInstance,
    FinishMove,
    ImportInstance,
    InstanceRecord,
    host_port_key,
)

__all__ = ["move_instance"]

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
