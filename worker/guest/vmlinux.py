"""The guest kernel every VMM boots: the PVH ``vmlinux`` inside a bzImage, extracted once.

QEMU boots it too (``boot_kernel``): a PVH entry skips what a bzImage does first in the
guest, its real-mode setup and the payload's decompression, which under emulation cost a
boot ~0.3-0.4 s (bench/guest_boot.py measures both).

Cloud Hypervisor boots a kernel directly only as an ELF with a PVH entry point (the Xen
ELF note ``XEN_ELFNOTE_PHYS32_ENTRY``, type 18); it cannot boot a bzImage, which is what
Debian ships and QEMU takes. A bzImage carries that ELF as its compressed payload: the
setup header gives its offset (``payload_offset`` at 0x248, counted from the start of the
protected-mode code, which follows the ``setup_sects`` setup sectors) and its length
(``payload_length`` at 0x24c). The kernel build appends the decompressed size as 4 bytes
to every payload but a gzip one; Debian's cloud kernel uses LZ4 in its legacy frame
format (``lz4 -l``), which Debian's ``lz4`` decompresses once those 4 bytes are cut off.

The result is cached next to the kernel (``vmlinuz-<v>`` -> ``vmlinux-<v>``), with a
``.source`` file beside it naming the size and mtime of the bzImage it came from, so a
replaced kernel is extracted again. It is written to a temporary name and renamed, so a
crash never leaves half a kernel under the cached name.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import anyio

from ._run import run
from .errors import GuestAssetError

log = logging.getLogger(__name__)

__all__ = [
    "PVH_NOTE_TYPE",
    "boot_kernel",
    "decompress_payload",
    "elf_notes",
    "ensure_vmlinux",
    "extract_payload",
    "has_pvh_entry",
    "vmlinux_path",
]

#: XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit PVH entry point Cloud Hypervisor jumps to.
PVH_NOTE_TYPE = 18

_ELF_MAGIC = b"\x7fELF"
_PT_NOTE = 4
_SETUP_MAGIC = b"HdrS"

# Payload formats by magic; every one but gzip ends with the 4-byte decompressed size.
_LZ4_LEGACY = b"\x02\x21\x4c\x18"
_GZIP = b"\x1f\x8b"
_XZ = b"\xfd7zXZ\x00"
_ZSTD = b"\x28\xb5\x2f\xfd"


def extract_payload(bzimage: bytes) -> bytes:
    """The compressed kernel a bzImage carries, as its setup header locates it."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != _SETUP_MAGIC:
        raise GuestAssetError("not a bzImage (no HdrS setup header)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise GuestAssetError(f"boot protocol {version:#x} has no payload fields (needs 2.08)")
    setup_sects = bzimage[0x1F1] or 4  # 0 means 4, for historical reasons
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(bzimage):
        raise GuestAssetError("the bzImage's payload lies outside the file")
    return bzimage[start : start + length]


async def decompress_payload(payload: bytes) -> bytes:
    """The ELF a payload compresses; its appended size, when it has one, must match."""
    if payload.startswith(_GZIP):
        return await anyio.to_thread.run_sync(gzip.decompress, payload)
    body, size = payload[:-4], struct.unpack("<I", payload[-4:])[0]
    if payload.startswith(_LZ4_LEGACY):
        data = await run(["lz4", "-dc"], input=body)
    elif payload.startswith(_ZSTD):
        data = await run(["zstd", "-dc"], input=body)
    elif payload.startswith(_XZ):
        data = await anyio.to_thread.run_sync(lzma.decompress, body)
    else:
        raise GuestAssetError(f"unknown kernel payload compression (magic {payload[:4].hex()})")
    if len(data) != size:
        raise GuestAssetError(f"payload decompressed to {len(data)} bytes, the kernel says {size}")
    return data


def elf_notes(elf: bytes | Path) -> list[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of every note in the PT_NOTE segments of a 64-bit ELF, given
    as bytes or as a file (read piecewise: a vmlinux is tens of megabytes)."""
    if isinstance(elf, Path):
        with elf.open("rb") as f:
            return _elf_notes(lambda offset, size: _pread(f, offset, size))
    return _elf_notes(lambda offset, size: elf[offset : offset + size])


def _pread(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _elf_notes(read: Callable[[int, int], bytes]) -> list[tuple[bytes, int, bytes]]:
    header = read(0, 64)
    if len(header) < 64 or not header.startswith(_ELF_MAGIC) or header[4:6] != b"\x02\x01":
        raise GuestAssetError("not a little-endian 64-bit ELF")
    phoff = struct.unpack_from("<Q", header, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
    notes: list[tuple[bytes, int, bytes]] = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", read(phoff + i * phentsize, 40)
        )
        if p_type == _PT_NOTE:
            notes.extend(_notes(read(p_offset, p_filesz)))
    return notes


def _notes(segment: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    pos = 0
    while pos + 12 <= len(segment):
        namesz, descsz, note_type = struct.unpack_from("<III", segment, pos)
        name_at = pos + 12
        desc_at = name_at + _align4(namesz)
        yield (
            segment[name_at : name_at + namesz].rstrip(b"\0"),
            note_type,
            segment[desc_at : desc_at + descsz],
        )
        pos = desc_at + _align4(descsz)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def has_pvh_entry(elf: bytes | Path) -> bool:
    return any(name == b"Xen" and kind == PVH_NOTE_TYPE for name, kind, _ in elf_notes(elf))


def vmlinux_path(kernel: Path) -> Path:
    """Where the extracted kernel of ``kernel`` is cached: beside it."""
    name = kernel.name
    if name.startswith("vmlinuz"):
        return kernel.with_name("vmlinux" + name[len("vmlinuz") :])
    return kernel.with_name(name + ".vmlinux")


async def ensure_vmlinux(kernel: Path) -> Path:
    """A PVH ELF kernel for Cloud Hypervisor: ``kernel`` itself if it is one, else the one
    extracted from it (once; cached beside it)."""
    with kernel.open("rb") as f:
        head = f.read(4)
    if head == _ELF_MAGIC:
        if not await anyio.to_thread.run_sync(has_pvh_entry, kernel):
            raise GuestAssetError(f"{kernel} is an ELF kernel without a PVH entry note")
        return kernel
    target = vmlinux_path(kernel)
    source = target.with_name(target.name + ".source")
    stamp = _stamp(kernel)
    if target.is_file() and _read(source) == stamp:
        return target
    # Tens of megabytes: read, checked and written off the event loop.
    bzimage = await anyio.to_thread.run_sync(kernel.read_bytes)
    elf = await decompress_payload(extract_payload(bzimage))
    if not await anyio.to_thread.run_sync(has_pvh_entry, elf):
        raise GuestAssetError(f"{kernel.name}: its vmlinux has no PVH entry (CONFIG_PVH=y?)")
    await anyio.to_thread.run_sync(_write_beside, target, elf)
    _write_beside(source, stamp.encode())
    return target


async def boot_kernel(kernel: Path) -> Path:
    """The kernel file guests boot from: the PVH ``vmlinux`` of ``kernel`` when it has one,
    else ``kernel`` as it is (QEMU boots a bzImage as well, more slowly; Cloud Hypervisor
    then cannot boot it, and says so when it is chosen)."""
    try:
        return await ensure_vmlinux(kernel)
    except (GuestAssetError, OSError) as exc:
        log.warning("booting %s as it is, without a PVH entry: %s", kernel.name, exc)
        return kernel


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_beside(target: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise GuestAssetError(f"cannot write {target} beside its kernel: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
