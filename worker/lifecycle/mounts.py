"""Volume mounts: hypeman's rules for mount paths, and how mounts become guest disks."""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Iterable, Iterator, Sequence

from schemas.errors import BadRequest, Conflict
from schemas.messages import MountSpec
from worker.drivers.base import DiskSpec
from worker.guest import GuestVolumeMount
from worker.storage import GuestDir
from worker.volumes import VolumeStore

__all__ = ["FORBIDDEN_MOUNT_ROOTS", "MAX_VOLUME_DISKS", "check_mounts", "volume_disks"]

#: A volume may not be mounted at, or under, any of these (hypeman's list).
FORBIDDEN_MOUNT_ROOTS = (
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib64",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
)
#: vdd..vdz, as in hypeman: every volume takes a disk, an overlay volume two.
MAX_VOLUME_DISKS = 23


def check_mount_path(path: str) -> str:
    if not path.startswith("/"):
        raise BadRequest(f"mount path {path!r} must be absolute", code="invalid_mount_path")
    clean = posixpath.normpath(path)
    if clean.startswith("//"):
        clean = "/" + clean.lstrip("/")
    if any(c in path for c in "\0\n") or " " in path:
        raise BadRequest(f"mount path {path!r} has forbidden characters", code="invalid_mount_path")
    for root in FORBIDDEN_MOUNT_ROOTS:
        if clean == root or (root != "/" and clean.startswith(root + "/")):
            raise BadRequest(
                f"mount path {path!r} is a system directory ({root})", code="invalid_mount_path"
            )
    return clean


def check_mounts(mounts: Sequence[MountSpec]) -> None:
    """Every rule that does not need the volumes themselves."""
    seen: set[str] = set()
    disks = 0
    for mount in mounts:
        clean = check_mount_path(mount.mount_path)
        if clean in seen:
            raise BadRequest(f"duplicate mount path {clean}", code="invalid_mount_path")
        seen.add(clean)
        if mount.overlay and not mount.readonly:
            raise BadRequest("overlay requires readonly=true", code="invalid_volume")
        if mount.overlay and mount.overlay_bytes <= 0:
            raise BadRequest("overlay requires overlay_size", code="invalid_volume")
        disks += 2 if mount.overlay else 1
    if disks > MAX_VOLUME_DISKS:
        raise BadRequest(f"at most {MAX_VOLUME_DISKS} volume disks", code="too_many_volumes")


def volume_disks(
    mounts: Iterable[MountSpec],
    volumes: VolumeStore,
    guest: GuestDir,
    slots: Iterable[int] | None = None,
) -> tuple[list[DiskSpec], list[GuestVolumeMount]]:
    """Disks for the VMM and mounts for the guest, one root-port slot per disk, taken in
    order from ``slots`` (all slots from 1 on a fresh boot)."""
    free = iter(slots if slots is not None else itertools.count(1))
    disks: list[DiskSpec] = []
    guest_mounts: list[GuestVolumeMount] = []
    for mount in mounts:
        base = _disk(
            _next(free), str(volumes.data_path(mount.volume_id)), mount.readonly, mount.volume_id
        )
        disks.append(base)
        if mount.overlay:
            upper = _disk(
                _next(free), str(guest.volume_overlay(mount.volume_id)), False, mount.volume_id
            )
            disks.append(upper)
            guest_mounts.append(
                GuestVolumeMount(
                    device=f"serial:{base.serial}",
                    path=mount.mount_path,
                    mode="overlay",
                    overlay_device=f"serial:{upper.serial}",
                )
            )
        else:
            guest_mounts.append(
                GuestVolumeMount(
                    device=f"serial:{base.serial}",
                    path=mount.mount_path,
                    mode="ro" if mount.readonly else "rw",
                )
            )
    return disks, guest_mounts


def _next(free: Iterator[int]) -> int:
    slot = next(free, None)
    if slot is None:
        raise Conflict("no free hot-plug slot on this VM", code="too_many_volumes")
    return slot


def _disk(slot: int, path: str, readonly: bool, volume_id: str) -> DiskSpec:
    return DiskSpec(
        id=f"vol{slot}",
        path=path,
        readonly=readonly,
        serial=f"vmfleet-vol{slot}",
        slot=slot,
        volume_id=volume_id,
    )
