"""A stand-in for the host engine, as much of it as the auto-standby controller uses: the
records, ``ctx.save``/``ctx.oplog``, and ``execute`` of a Standby that runs the real
idle-standby check under a per-instance lock and then takes the instance to Standby."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.errors import NotFound
from schemas.messages import InstanceCommand, InstanceRecord, Standby
from tests.support.gateway import instance_record
from worker.autostandby.policy import check_idle_standby
from worker.engine import HostEngine


class _Inst:
    def __init__(self, record: InstanceRecord) -> None:
        self.record = record

    @property
    def id(self) -> str:
        return self.record.id


class _Ctx:
    def __init__(self) -> None:
        self.saves = 0
        self.oplines: list[str] = []

    def save(self, inst: _Inst, **changes: object) -> None:
        inst.record = msgspec.structs.replace(inst.record, **changes)
        self.saves += 1

    def oplog(self, inst: _Inst, message: str, **fields: object) -> None:
        self.oplines.append(message)


class EngineDouble:
    def __init__(self) -> None:
        self.ctx = _Ctx()
        self._instances: dict[str, _Inst] = {}
        self.lock = anyio.Lock()
        self.executed: list[InstanceCommand] = []

    def add(self, record: InstanceRecord) -> None:
        self._instances[record.id] = _Inst(record)

    def records(self) -> Iterator[InstanceRecord]:
        return (inst.record for inst in list(self._instances.values()))

    def get(self, instance_id: str) -> InstanceRecord:
        return self.instance(instance_id).record

    def instance(self, instance_id: str) -> Any:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise NotFound(f"instance {instance_id} not found")
        return inst

    async def execute(self, cmd: InstanceCommand) -> InstanceRecord:
        async with self.lock:
            self.executed.append(cmd)
            inst = self.instance(cmd.instance_id)
            assert isinstance(cmd, Standby)
            if cmd.cause == "idle":
                check_idle_standby(inst.record, utc_now())
            inst.record = msgspec.structs.replace(
                inst.record, state=InstanceState.STANDBY, cause=cmd.cause, has_snapshot=True
            )
            return inst.record  # type: ignore[no-any-return]

    def as_engine(self) -> HostEngine:
        return self  # type: ignore[return-value]


def record(instance_id: str, **fields: object) -> InstanceRecord:
    """A Running record with networking (user mode's guest address) and a started_at in
    the past, so that the idle clock is the only clock."""
    values: dict[str, object] = {
        "network_enabled": True,
        "ip": "10.0.2.15",
        "started_at": datetime(2026, 1, 1, tzinfo=UTC),
        **fields,
    }
    return instance_record(instance_id, instance_id, "h1", **values)
