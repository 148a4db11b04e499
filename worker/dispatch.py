"""Turning a command into its effect and a CommandResult; every error becomes a result."""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore

from schemas.api import InstanceState
from schemas.errors import BadRequest, NotFound, VmfleetError
from schemas.messages import (
    AnyCommand,
    CommandResult,
    Create,
    CreateSnapshot,
    CreateVolume,
    DeleteImage,
    DeleteSnapshot,
    DeleteVolume,
    ExportInstance,
    FetchSnapshot,
    FinishMove,
    ImportInstance,
    InstanceCommand,
    InstanceRecord,
    PublishSnapshot,
    PullImage,
    VolumeRecord,
)
from schemas.snapshots import ForkSource
from worker.engine import HostEngine
from worker.images import ImagePuller
from worker.publisher import RecordPublisher
from worker.snapshots.service import SnapshotService
from worker.transfer.move import Mover
from worker.transfer.snapshots import SnapshotTransfers
from worker.volumes import VolumeStore

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        engine: HostEngine,
        volumes: VolumeStore,
        publisher: RecordPublisher,
        archives: ObjectStore | None = None,
        puller: ImagePuller | None = None,
        mover: Mover | None = None,
        snapshot_transfers: SnapshotTransfers | None = None,
        snapshots: SnapshotService | None = None,
    ) -> None:
        self.engine = engine
        self.volumes = volumes
        self.publisher = publisher
        self.archives = archives
        self.puller = puller
        self.mover = mover
        self.snapshot_transfers = snapshot_transfers
        self.snapshots = snapshots

    async def __call__(self, cmd: AnyCommand) -> CommandResult:
        try:
            result = await self._run(cmd)
        except VmfleetError as exc:
            result = CommandResult(command_id=cmd.id, ok=False, error=exc.info())
        except Exception as exc:
            log.exception("command %s (%s) failed", cmd.id, cmd.op)
            result = CommandResult(
                command_id=cmd.id, ok=False, error=VmfleetError(f"{cmd.op} failed: {exc}").info()
            )
        # The outcome is in NATS before anyone is told about it; a record NATS refused
        # or could not take in time fails this command, not the host.
        key = getattr(cmd, "instance_id", None) or getattr(cmd, "volume_id", None)
        try:
            await self.publisher.flush(key)
        except VmfleetError as exc:
            log.warning("command %s (%s): %s", cmd.id, cmd.op, exc)
            if result.ok:
                result = CommandResult(command_id=cmd.id, ok=False, error=exc.info())
        return result

    async def _run(self, cmd: AnyCommand) -> CommandResult:
        match cmd:
            case CreateVolume(archive=None):
                volume = await self.volumes.create(cmd.volume_id, cmd.name, cmd.size_gb)
                return CommandResult(command_id=cmd.id, ok=True, volume=volume)
            case CreateVolume(archive=str(name)):
                volume = await self._volume_from_archive(cmd, name)
                return CommandResult(command_id=cmd.id, ok=True, volume=volume)
            case DeleteVolume():
                self.volumes.delete(cmd.volume_id)
                return CommandResult(command_id=cmd.id, ok=True)
            case PullImage():
                if self.puller is None:
                    raise BadRequest("this worker takes no image pulls")
                image = await self.puller.pull(cmd)
                return CommandResult(command_id=cmd.id, ok=True, image=image)
            case DeleteImage():
                if self.puller is None:
                    raise BadRequest("this worker keeps no images")
                await self.puller.remove(cmd, self._image_in_use)
                return CommandResult(command_id=cmd.id, ok=True)
            case ExportInstance() | ImportInstance() | FinishMove():
                return await self._move(cmd)
            case PublishSnapshot():
                await self._transfers().publish(cmd)
                return CommandResult(command_id=cmd.id, ok=True)
            case FetchSnapshot():
                await self._transfers().fetch(cmd)
                return CommandResult(command_id=cmd.id, ok=True)
            case DeleteSnapshot():
                await self._snapshots().delete(cmd.snapshot_id)
                return CommandResult(command_id=cmd.id, ok=True)
            case Create(fork=ForkSource()):
                return await self._fork(cmd)
            case CreateSnapshot():
                # The snapshot is on disk once the engine returns; its record follows (a
                # redelivery finds the snapshot made and writes the record again).
                record = await self.engine.execute(cmd)
                await self._snapshots().publish(cmd.snapshot_id)
                return CommandResult(command_id=cmd.id, ok=True, instance=record)
            case InstanceCommand():
                if self._already_applied(cmd):
                    return CommandResult(
                        command_id=cmd.id, ok=True, instance=self.engine.get(cmd.instance_id)
                    )
                record = await self.engine.execute(cmd)
                return CommandResult(command_id=cmd.id, ok=True, instance=record)
        raise BadRequest(f"unknown command {cmd.op}")

    async def _fork(self, cmd: Create) -> CommandResult:
        """A create that forks a snapshot, between its started and finished events."""
        assert cmd.fork is not None
        if self._already_applied(cmd):
            return CommandResult(
                command_id=cmd.id, ok=True, instance=self.engine.get(cmd.instance_id)
            )
        snapshots = self._snapshots()
        manifest = snapshots.store.read(cmd.fork.snapshot_id)
        source = manifest.source.id if manifest is not None else ""
        event = functools.partial(
            snapshots.event,
            "fork",
            instance_id=cmd.instance_id,
            name=cmd.name,
            snapshot_id=cmd.fork.snapshot_id,
            source_instance_id=source,
        )
        await event("started", state=InstanceState.CREATED)
        try:
            record = await self.engine.execute(cmd)
        except Exception as exc:
            await event("failed", error=str(exc))
            raise
        await event("finished")
        return CommandResult(command_id=cmd.id, ok=True, instance=record)

    def _snapshots(self) -> SnapshotService:
        if self.snapshots is None:
            raise BadRequest("this worker keeps no snapshots")
        return self.snapshots

    def _transfers(self) -> SnapshotTransfers:
        if self.snapshot_transfers is None:
            raise BadRequest("this worker sends and fetches no snapshots")
        return self.snapshot_transfers

    async def _move(self, cmd: ExportInstance | ImportInstance | FinishMove) -> CommandResult:
        """One step of moving an instance between hosts (worker.transfer.move)."""
        if self.mover is None:
            raise BadRequest("this worker moves no instances")
        match cmd:
            case ExportInstance():
                record: InstanceRecord | None = await self.mover.export(cmd)
            case ImportInstance():
                record = await self.mover.import_(cmd)
            case FinishMove():
                record = await self.mover.finish(cmd)
        return CommandResult(command_id=cmd.id, ok=True, instance=record)

    async def _volume_from_archive(self, cmd: CreateVolume, name: str) -> VolumeRecord:
        """Fetch the uploaded archive to a local file, build the volume, drop the upload."""
        if self.archives is None:
            raise BadRequest("this worker takes no archives")
        with tempfile.NamedTemporaryFile(dir=self.volumes.root.parent, suffix=".tar.gz") as local:
            try:
                await self.archives.get(name, writeinto=local)  # type: ignore[arg-type]
            except ObjectNotFoundError:
                raise NotFound(f"archive {name} is not in the archive store") from None
            local.flush()
            volume = await self.volumes.create_from_archive(
                cmd.volume_id, cmd.name, cmd.size_gb, Path(local.name)
            )
        await self.archives.delete(name)
        return volume

    def _image_in_use(self, digest: str) -> bool:
        return any(record.image_digest == digest for record in self.engine.records())

    def _already_applied(self, cmd: InstanceCommand) -> bool:
        """A redelivered command whose effect is already in the record (the worker died
        after doing it, before acking): answer it, do not run it again."""
        try:
            record = self.engine.get(cmd.instance_id)
        except NotFound:
            return False
        return record.last_command_id == cmd.id
