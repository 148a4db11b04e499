"""An empty qcow2 v3 image over a backing file: the copy-on-write layer of a fork's disk.

Written here rather than by ``qemu-img create -f qcow2 -b BASE -F raw``: the hosts have QEMU
but not qemu-utils, and an empty image is four clusters of fixed layout (the one qemu-img
writes): the header with the backing file's format and name, the refcount table, one
refcount block, and an all-zero L1 table. Every read of an unallocated cluster falls through
to the backing file; writes allocate clusters in this file only.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Final

__all__ = ["create_overlay", "read_backing"]

_MAGIC: Final = b"QFI\xfb"
_CLUSTER_BITS: Final = 16
_CLUSTER: Final = 1 << _CLUSTER_BITS
_HEADER_LENGTH: Final = 104
_REFCOUNT_ORDER: Final = 4  # 16-bit refcounts, qemu-img's default
_EXT_BACKING_FORMAT: Final = 0xE2792ACA
_L2_ENTRIES: Final = _CLUSTER // 8


def create_overlay(path: Path, *, backing: str, backing_format: str, size_bytes: int) -> None:
    """Write an empty qcow2 of ``size_bytes`` whose unwritten clusters read from ``backing``
    (relative paths are resolved from the image's directory, as QEMU does)."""
    l1_entries = -(-size_bytes // (_CLUSTER * _L2_ENTRIES))
    l1_clusters = max(1, -(-(l1_entries * 8) // _CLUSTER))
    refcount_table, refcount_block, l1_table = _CLUSTER, 2 * _CLUSTER, 3 * _CLUSTER
    clusters = 3 + l1_clusters
    if clusters > _CLUSTER // 2:  # one refcount block counts 32768 clusters
        raise ValueError(f"a {size_bytes}-byte qcow2 needs more than one refcount block")
    header = _header(backing, backing_format, size_bytes, l1_entries, l1_table)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(header)
        out.seek(refcount_table)
        out.write(struct.pack(">Q", refcount_block))
        out.seek(refcount_block)
        out.write(struct.pack(f">{clusters}H", *([1] * clusters)))
        out.truncate(l1_table + l1_clusters * _CLUSTER)  # the L1 table: zeros, a hole
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


def _header(
    backing: str, backing_format: str, size_bytes: int, l1_entries: int, l1_table: int
) -> bytes:
    name = backing.encode()
    fmt = backing_format.encode()
    extensions = struct.pack(">II", _EXT_BACKING_FORMAT, len(fmt)) + _pad8(fmt)
    extensions += struct.pack(">II", 0, 0)  # end of the extensions
    backing_offset = _HEADER_LENGTH + len(extensions)
    if backing_offset + len(name) > _CLUSTER:
        raise ValueError("backing file name too long for a qcow2 header")
    fixed = struct.pack(
        ">4sIQIIQIIQQIIQQQQII",
        _MAGIC,
        3,  # version
        backing_offset,
        len(name),
        _CLUSTER_BITS,
        size_bytes,
        0,  # no encryption
        l1_entries,
        l1_table,
        _CLUSTER,  # refcount table offset
        1,  # refcount table clusters
        0,  # snapshots
        0,  # snapshots offset
        0,  # incompatible features
        0,  # compatible features
        0,  # autoclear features
        _REFCOUNT_ORDER,
        _HEADER_LENGTH,
    )
    assert len(fixed) == _HEADER_LENGTH
    return fixed + extensions + name


def _pad8(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 8)


def read_backing(path: Path) -> str | None:
    """The backing file name a qcow2 image names (None: none, or not a qcow2)."""
    with open(path, "rb") as image:
        head = image.read(_HEADER_LENGTH)
        if len(head) < 20 or head[:4] != _MAGIC:
            return None
        offset, size = struct.unpack(">QI", head[8:20])
        if not offset:
            return None
        image.seek(offset)
        return image.read(size).decode()
