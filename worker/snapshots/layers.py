"""Copy-on-write disks: a writable qcow2 layer over read-only files shared by hard link.

A snapshot's disk is a chain of files under its ``disks/`` directory: the instance's raw
overlay at capture, or, for an instance that was itself forked, a copy of its qcow2 layer
plus the files below it. Each qcow2 names its backing file by a path relative to its own
directory, so a chain works wherever its files keep their relative places.

A fork (or a restore in place) gets hard links of the snapshot's chain under
``<guest>/disks/<snapshot id>/`` (never written; the snapshot may be deleted meanwhile and
they live on; two snapshots' files of the same name never meet) and a new empty qcow2 layer
``<guest>/disks/<disk id>-<instance id>-<n>.qcow2`` over its top (backing name
``<snapshot id>/<file>``), the only file the VM writes. ``<disk id>.top`` names that
layer: :func:`instance_disk` finds it, so a later cold start of the instance boots from the
same layer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from schemas.errors import VmfleetError
from worker.snapshots.qcow2 import create_overlay, read_backing
from worker.storage import write_atomic

__all__ = ["chain", "disk_format", "instance_disk", "link_chain", "new_top_layer"]

_QCOW2_MAGIC = b"QFI\xfb"


def disk_format(path: Path) -> str:
    with open(path, "rb") as image:
        return "qcow2" if image.read(4) == _QCOW2_MAGIC else "raw"


def chain(top: Path) -> Iterator[Path]:
    """``top`` and every file below it (backing names are resolved in top's directory)."""
    current: Path | None = top
    seen: set[Path] = set()
    while current is not None:
        if current in seen:
            raise VmfleetError(f"disk chain of {top.name} loops at {current.name}")
        seen.add(current)
        yield current
        backing = read_backing(current) if disk_format(current) == "qcow2" else None
        current = current.parent / backing if backing else None


def link_chain(top: Path, directory: Path) -> Path:
    """Hard links of ``top``'s chain under ``directory``, each at its path relative to
    ``top``'s directory (so the backing names in the headers still resolve); the new top.
    A name already there must be the same file: a chain is linked into a directory of its
    own (a snapshot's id), never over another's."""
    for path in chain(top):
        target = directory / path.relative_to(top.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(path, target)
        elif not os.path.samefile(path, target):
            raise VmfleetError(f"{target} is another file than {path}")
    return directory / top.name


def new_top_layer(directory: Path, disk_id: str, instance_id: str, base: Path) -> Path:
    """An empty qcow2 in ``directory`` over ``base`` (a file under it), recorded as the
    disk's top."""
    size = _virtual_size(base)
    n = 0
    while (layer := directory / f"{disk_id}-{instance_id}-{n}.qcow2").exists():
        n += 1
    create_overlay(
        layer,
        backing=str(base.relative_to(directory)),
        backing_format=disk_format(base),
        size_bytes=size,
    )
    write_atomic(directory / f"{disk_id}.top", layer.name.encode())
    return layer


def instance_disk(guest_root: Path, disk_id: str) -> tuple[Path, str] | None:
    """The writable layer of an instance's disk made by a fork or a snapshot restore, and
    its format (None: the instance has its plain overlay)."""
    try:
        name = (guest_root / "disks" / f"{disk_id}.top").read_text().strip()
    except FileNotFoundError:
        return None
    return guest_root / "disks" / name, "qcow2"


def _virtual_size(path: Path) -> int:
    if disk_format(path) == "raw":
        return path.stat().st_size
    with open(path, "rb") as image:
        image.seek(24)
        return int.from_bytes(image.read(8), "big")
