"""The PVH vmlinux Cloud Hypervisor boots, extracted from Debian's cloud bzImage."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from worker.guest import GuestAssetError, boot_kernel, ensure_kernel
from worker.guest.vmlinux import (
    PVH_NOTE_TYPE,
    elf_notes,
    ensure_vmlinux,
    extract_payload,
    has_pvh_entry,
    vmlinux_path,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def bzimage(test_assets: Path) -> Path:
    return (await ensure_kernel(test_assets)).bzimage


async def test_the_debian_kernel_yields_an_elf_with_the_pvh_entry(bzimage: Path) -> None:
    vmlinux = await ensure_vmlinux(bzimage)
    assert vmlinux == vmlinux_path(bzimage) and vmlinux.parent == bzimage.parent
    assert vmlinux.name.startswith("vmlinux-")
    with vmlinux.open("rb") as f:
        assert f.read(5) == b"\x7fELF\x02"  # a 64-bit ELF
    notes = elf_notes(vmlinux)
    entry = [desc for name, kind, desc in notes if name == b"Xen" and kind == PVH_NOTE_TYPE]
    assert len(entry) == 1, "one XEN_ELFNOTE_PHYS32_ENTRY note"
    (address,) = struct.unpack("<I", entry[0][:4])
    assert 0x100000 <= address < 0x4000000  # a 32-bit physical entry above 1 MiB
    assert has_pvh_entry(vmlinux)


async def test_the_payload_is_lz4_legacy_and_its_trailer_is_the_size(bzimage: Path) -> None:
    payload = extract_payload(bzimage.read_bytes())
    assert payload[:4] == b"\x02\x21\x4c\x18"  # the LZ4 legacy frame magic
    size = struct.unpack("<I", payload[-4:])[0]
    assert (await ensure_vmlinux(bzimage)).stat().st_size == size


async def test_extraction_is_cached_until_the_kernel_changes(bzimage: Path, tmp_path: Path) -> None:
    kernel = tmp_path / bzimage.name
    shutil.copy2(bzimage, kernel)
    first = await ensure_vmlinux(kernel)
    inode = first.stat().st_ino
    assert (await ensure_vmlinux(kernel)).stat().st_ino == inode  # cached, not rewritten
    os.utime(kernel, ns=(kernel.stat().st_atime_ns, kernel.stat().st_mtime_ns + 10**9))
    again = await ensure_vmlinux(kernel)
    assert again == first and again.stat().st_ino != inode  # a replaced kernel: extracted anew
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


async def test_a_pvh_elf_kernel_is_used_as_it_is(bzimage: Path) -> None:
    vmlinux = await ensure_vmlinux(bzimage)
    assert await ensure_vmlinux(vmlinux) == vmlinux


async def test_what_is_not_a_bzimage_or_a_pvh_elf_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz-junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(GuestAssetError, match="not a bzImage"):
        await ensure_vmlinux(junk)
    # A 64-bit ELF header with no program headers: no notes, so no PVH entry.
    elf = tmp_path / "vmlinux-bare"
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHI", 2, 62, 1)
    elf.write_bytes(header + b"\0" * (64 - len(header)))
    with pytest.raises(GuestAssetError, match="without a PVH entry"):
        await ensure_vmlinux(elf)


async def test_guests_boot_the_pvh_vmlinux_or_else_the_kernel_as_it_is(
    bzimage: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What every VMM is given (worker.daemon.prepare_host): the extracted vmlinux, which
    boots faster under QEMU; a kernel without one is booted as it is, with a warning."""
    assert await boot_kernel(bzimage) == await ensure_vmlinux(bzimage)
    junk = tmp_path / "vmlinuz-operator"
    junk.write_bytes(b"\0" * 4096)
    assert await boot_kernel(junk) == junk
    assert "booting vmlinuz-operator as it is" in caplog.text
