"""What a saved VM depends on outside itself: the VMM that saved it (kind and version) and
the kernel and initrd it booted. A snapshot records them; a restore or fork on a host whose
VMM or kernel differ is refused before any VMM reads the snapshot, since neither
QEMU's migration stream nor Cloud Hypervisor's state is promised to load elsewhere (and a
guest resumed under another kernel image would crash on its next page fault)."""

from __future__ import annotations

from pathlib import Path

import anyio.to_thread

from schemas.errors import Conflict
from schemas.snapshots import FileIdentity, SnapshotManifest
from worker.drivers.base import Hypervisor, VmSpec
from worker.run import CommandFailed, run_command
from worker.snapshots.store import sha256_file

__all__ = ["check_compatible", "file_identity", "vmm_version"]

_versions: dict[str, str] = {}
_digests: dict[tuple[str, int, int], str] = {}


async def vmm_version(driver: Hypervisor, spec: VmSpec) -> str:
    """The first line of ``<vmm> --version`` for the driver that runs ``spec`` (cached)."""
    for_spec = getattr(driver, "driver_for", None)
    actual = for_spec(spec) if for_spec is not None else driver
    binary = str(getattr(actual, "binary", actual.name))
    if binary not in _versions:
        try:
            out = await run_command([binary, "--version"], 30)
        except CommandFailed as exc:
            return f"{actual.name} (version unknown: {exc})"
        lines = out.decode(errors="replace").strip().splitlines()
        _versions[binary] = lines[0].strip() if lines else actual.name
    return _versions[binary]


async def file_identity(path: str) -> FileIdentity:
    """A kernel's or initrd's path and content digest (cached by size and mtime)."""
    info = Path(path).stat()
    key = (path, info.st_size, info.st_mtime_ns)
    if key not in _digests:
        _digests[key] = await anyio.to_thread.run_sync(sha256_file, Path(path))
    return FileIdentity(path=path, sha256=_digests[key])


async def check_compatible(
    driver: Hypervisor, manifest: SnapshotManifest, spec: VmSpec, kernel: Path
) -> None:
    """409 ``snapshot_incompatible`` unless this host would resume the snapshot with the
    same VMM (kind and version) and the same kernel (``kernel``: the one this host boots).
    The initrd is recorded but not compared: a resumed guest has long unpacked it, and the
    worker rebuilds it when its module list changes."""
    if manifest.hypervisor != spec.hypervisor:
        raise _incompatible(manifest, f"it was taken under {manifest.hypervisor}")
    version = await vmm_version(driver, spec)
    if version != manifest.vmm_version:
        raise _incompatible(
            manifest, f"it was taken by {manifest.vmm_version!r}; this host runs {version!r}"
        )
    try:
        identity = await file_identity(str(kernel))
    except OSError as exc:
        raise _incompatible(manifest, f"this host has no kernel at {kernel}: {exc}") from exc
    if identity.sha256 != manifest.kernel.sha256:
        raise _incompatible(manifest, "this host's kernel is not the one the guest booted")


def _incompatible(manifest: SnapshotManifest, why: str) -> Conflict:
    return Conflict(
        f"snapshot {manifest.id} cannot be resumed on this host: {why}",
        code="snapshot_incompatible",
    )
