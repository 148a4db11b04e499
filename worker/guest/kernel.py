"""The guest kernel: Debian's cloud kernel fetched as a package, or one the operator names.

Layout under ``<data_dir>/system/kernel/``::

    <version>/root/boot/vmlinuz-<version>        the bzImage QEMU boots
    <version>/root/lib/modules/<version>/        its modules (modules.dep made by depmod)

The package is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``; nothing is
installed on the host. A version directory appears only once complete (it is unpacked beside it
and renamed into place), so an existing one is trusted and no apt command runs again.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio

from ._run import run
from .errors import GuestAssetError

__all__ = [
    "BOOT_ARGS",
    "DEFAULT_KERNEL_PACKAGE",
    "GuestAssetError",
    "KernelAssets",
    "ensure_kernel",
    "kernel_dir",
    "read_bzimage_version",
]

DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"

#: What every boot of the guest kernel is given, before the init's own words: the console
#: on the first UART, a quiet boot, and a panic powers the VM off instead of hanging (with
#: -no-reboot, QEMU then exits). ``cryptomgr.notests``: the crypto API's self-tests (each
#: algorithm of the kernel checked against known answers) took ~0.2 s of each boot under
#: emulation; kernels built for micro-VMs often leave them out
#: (CONFIG_CRYPTO_MANAGER_DISABLE_TESTS). FIPS mode runs them regardless.
BOOT_ARGS = "console=ttyS0 quiet panic=-1 cryptomgr.notests"

_VERSIONED_IMAGE = re.compile(r"^linux-image-(\d[\w.+~-]*)$")


@dataclass(frozen=True, slots=True)
class KernelAssets:
    """What a guest boots with.

    ``modules_root`` is the ``lib/modules/<version>`` directory of the kernel (None when an
    operator kernel has no modules here); ``initrd`` is set only when the operator supplied
    a ready initrd, which then replaces the one vmfleet builds.
    """

    version: str
    bzimage: Path
    modules_root: Path | None
    initrd: Path | None = None


def kernel_dir(data_dir: Path) -> Path:
    return data_dir / "system" / "kernel"


async def ensure_kernel(
    data_dir: Path,
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    package: str = DEFAULT_KERNEL_PACKAGE,
) -> KernelAssets:
    """Return the guest kernel, fetching and unpacking Debian's package on first use.

    ``kernel`` / ``initrd`` are operator overrides (the caller reads VMFLEET_KERNEL and
    VMFLEET_INITRD): with ``kernel`` set no package is fetched.
    """
    if kernel is not None:
        return _operator_kernel(kernel, initrd)
    if initrd is not None and not initrd.is_file():
        raise GuestAssetError(f"operator initrd {initrd} does not exist")

    base = kernel_dir(data_dir)
    found = _find_extracted(base)
    if found is None:
        version = await _resolve_version(package)
        found = _assets_for(base, version)
        if not found.bzimage.is_file():
            await _fetch_and_extract(base, version)
    if initrd is not None:
        return KernelAssets(found.version, found.bzimage, found.modules_root, initrd)
    return found


# --- operator kernel -------------------------------------------------------------------------


def read_bzimage_version(path: Path) -> str:
    """The kernel release string from a bzImage's setup header (``kernel_version`` field)."""
    with path.open("rb") as f:
        head = f.read(0x8000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise GuestAssetError(f"{path} is not a bzImage (no HdrS setup header)")
    offset = int.from_bytes(head[0x20E:0x210], "little")
    if offset == 0:
        raise GuestAssetError(f"{path} carries no kernel_version string")
    start = offset + 0x200
    with path.open("rb") as f:
        f.seek(start)
        raw = f.read(256)
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    if not text:
        raise GuestAssetError(f"{path} has an empty kernel_version string")
    return text.split()[0]


def _operator_kernel(kernel: Path, initrd: Path | None) -> KernelAssets:
    if not kernel.is_file():
        raise GuestAssetError(f"operator kernel {kernel} does not exist")
    if initrd is not None and not initrd.is_file():
        raise GuestAssetError(f"operator initrd {initrd} does not exist")
    try:
        version = read_bzimage_version(kernel)
    except GuestAssetError:
        if initrd is None:
            raise
        version = "unknown"
    host_modules = Path("/lib/modules") / version
    modules = host_modules if host_modules.is_dir() else None
    return KernelAssets(version, kernel, modules, initrd)


# --- Debian package --------------------------------------------------------------------------


def _assets_for(base: Path, version: str) -> KernelAssets:
    root = base / version / "root"
    return KernelAssets(
        version=version,
        bzimage=root / "boot" / f"vmlinuz-{version}",
        modules_root=root / "lib" / "modules" / version,
    )


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p]


def _find_extracted(base: Path) -> KernelAssets | None:
    """The newest complete unpacked kernel under ``base``, if any."""
    if not base.is_dir():
        return None
    versions = [
        d.name
        for d in base.iterdir()
        if d.is_dir() and not d.name.startswith(".") and _assets_for(base, d.name).bzimage.is_file()
    ]
    if not versions:
        return None
    return _assets_for(base, max(versions, key=_version_key))


def _parse_depends(output: str) -> str | None:
    for line in output.splitlines():
        key, _, value = line.strip().lstrip("|").partition(":")
        if key.strip() not in ("Depends", "PreDepends"):
            continue
        name = value.strip().split()[0] if value.strip() else ""
        m = _VERSIONED_IMAGE.match(name)
        if m:
            return m.group(1)
    return None


async def _resolve_version(package: str) -> str:
    """Resolve the meta package (e.g. linux-image-cloud-amd64) to a kernel release."""
    m = _VERSIONED_IMAGE.match(package)
    if m:  # already versioned, e.g. linux-image-6.1.0-56-cloud-amd64
        return m.group(1)
    try:
        out = await run(["apt-cache", "depends", "--important", package])
    except GuestAssetError:
        await _apt_update()
        out = await run(["apt-cache", "depends", "--important", package])
    version = _parse_depends(out.decode("utf-8", "replace"))
    if version is None:
        await _apt_update()
        out = await run(["apt-cache", "depends", "--important", package])
        version = _parse_depends(out.decode("utf-8", "replace"))
    if version is None:
        raise GuestAssetError(f"cannot resolve {package} to a versioned linux-image package")
    return version


async def _apt_update() -> None:
    await run(["apt-get", "update", "-q"])


async def _fetch_and_extract(base: Path, version: str) -> None:
    """Download ``linux-image-<version>``, unpack it and run depmod, then rename into place."""
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=base))
    try:
        pkg = f"linux-image-{version}"
        download = ["apt-get", "download", "-q", pkg]
        try:
            await run(download, cwd=work)
        except GuestAssetError:
            await _apt_update()
            await run(download, cwd=work)
        debs = sorted(work.glob(f"{pkg}_*.deb"))
        if not debs:
            raise GuestAssetError(f"apt-get download {pkg} produced no .deb in {work}")
        staged = work / version
        root = staged / "root"
        root.mkdir(parents=True)
        await run(["dpkg-deb", "-x", debs[0], root])
        assets = _assets_for(work, version)
        if not assets.bzimage.is_file():
            raise GuestAssetError(f"{debs[0].name} has no boot/vmlinuz-{version}")
        if assets.modules_root is not None and assets.modules_root.is_dir():
            await run(["depmod", "-b", root, version])
        for deb in debs:
            deb.unlink()
        try:
            staged.rename(base / version)
        except OSError:
            # Another caller won the race; its copy is complete, so use it.
            if not _assets_for(base, version).bzimage.is_file():
                raise
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
