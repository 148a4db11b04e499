"""Where a host keeps its warm templates, and which of them may be used.

Layout, under ``<data>/templates/``::

    <key>/              one template, complete (a build renames its directory here last)
        memory          the VMM's saved state (QEMU's migration stream)
        vm.json         the device model it was saved with (VmSpec)
        template.json   TemplateManifest: its shape and the host identity it was built on
        disk-*.img      placeholder disks (empty, never written by an instance)
        used            touched on every use (least recently used templates go first)
    .build-<key>-<n>/   a build under way; left over by a killed worker, swept at start

``<key>`` is a digest of the shape and of the host's identity (kernel and initrd contents,
VMM and its version, accelerator): a new kernel, initrd or VMM makes other keys, so an old
template is never found for them, and :meth:`TemplateStore.find` checks the manifest again
before anything is restored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import msgspec

from worker.resume import SavedVm
from worker.storage import write_atomic

__all__ = [
    "HostIdentity",
    "Template",
    "TemplateManifest",
    "TemplateShape",
    "TemplateStore",
    "file_digest",
]

log = logging.getLogger(__name__)

MANIFEST = "template.json"
BUILD_PREFIX = ".build-"
USED = "used"


class TemplateShape(msgspec.Struct, frozen=True, kw_only=True):
    """What an instance must share with a template to start from it."""

    memory_bytes: int
    vcpus: int
    #: One NIC (the instance has a network) or none.
    network: bool
    agent_channel: bool = True


class HostIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What this host boots guests with: a template of another identity is stale."""

    kernel: str
    kernel_sha256: str
    initrd: str
    initrd_sha256: str
    vmm: str
    vmm_version: str
    accel: str


class TemplateManifest(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    shape: TemplateShape
    host: HostIdentity
    built_at: float
    build_seconds: float
    size_bytes: int


class Template(msgspec.Struct, frozen=True, kw_only=True):
    manifest: TemplateManifest
    saved: SavedVm


def template_key(shape: TemplateShape, host: HostIdentity) -> str:
    encoded = msgspec.json.encode((shape, host))
    return hashlib.sha256(encoded).hexdigest()[:16]


_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): a changed file is read again."""
    st = path.stat()
    cache_key = (str(path), st.st_size, st.st_mtime_ns)
    found = _digests.get(cache_key)
    if found is None:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        found = _digests[cache_key] = digest.hexdigest()
    return found


def directory_bytes(path: Path) -> int:
    """Disk actually used (sparse placeholders count for what they hold)."""
    total = 0
    for item in path.rglob("*"):
        if item.is_file() and not item.is_symlink():
            total += item.stat().st_blocks * 512
    return total


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def find(self, shape: TemplateShape, host: HostIdentity) -> Template | None:
        """The complete, current template of ``shape``; None if there is none (or it is
        stale or unreadable: then it is removed)."""
        key = template_key(shape, host)
        directory = self.path(key)
        manifest = self._manifest(directory)
        if manifest is None:
            return None
        if manifest.host != host or manifest.shape != shape:
            log.warning("template %s was built for another kernel, initrd or VMM: removed", key)
            self.remove(key)
            return None
        try:
            saved = SavedVm.load(directory)
        except Exception as exc:
            log.error("template %s is unreadable (%s): removed", key, exc)
            self.remove(key)
            return None
        return Template(manifest=manifest, saved=saved)

    def mark_used(self, template: Template) -> None:
        (self.path(template.manifest.key) / USED).touch()

    def complete(self) -> list[TemplateManifest]:
        found = []
        for directory in self._dirs():
            manifest = self._manifest(directory)
            if manifest is not None:
                found.append(manifest)
        return found

    def sweep(self, host: HostIdentity) -> None:
        """At start: half-made builds (a worker killed while building) and templates of
        another host identity go."""
        for directory in self._dirs(include_builds=True):
            if directory.name.startswith(BUILD_PREFIX):
                log.info("removing an unfinished template build %s", directory.name)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            manifest = self._manifest(directory)
            if manifest is None or manifest.host != host:
                log.info("removing stale template %s", directory.name)
                shutil.rmtree(directory, ignore_errors=True)

    def used_bytes(self) -> int:
        return sum(m.size_bytes for m in self.complete())

    def evict_for(self, needed: int, budget: int, *, keep: str | None = None) -> bool:
        """Remove least recently used templates until ``needed`` more bytes fit in
        ``budget``; False if they cannot."""
        manifests = sorted(
            (m for m in self.complete() if m.key != keep), key=lambda m: self._last_used(m.key)
        )
        used = self.used_bytes()
        while used + needed > budget and manifests:
            victim = manifests.pop(0)
            log.info("template %s evicted (disk budget)", victim.key)
            self.remove(victim.key)
            used -= victim.size_bytes
        return used + needed <= budget

    def build_dir(self, key: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        directory = self.root / f"{BUILD_PREFIX}{key}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        directory.mkdir()
        return directory

    def publish(self, build: Path, manifest: TemplateManifest) -> Path:
        """The manifest, then the rename that makes the template complete."""
        write_atomic(build / MANIFEST, msgspec.json.encode(manifest))
        target = self.path(manifest.key)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        build.rename(target)
        return target

    def remove(self, key: str) -> None:
        shutil.rmtree(self.path(key), ignore_errors=True)

    def _last_used(self, key: str) -> float:
        for name in (USED, MANIFEST):
            try:
                return (self.path(key) / name).stat().st_mtime
            except OSError:
                continue
        return 0.0

    def _dirs(self, *, include_builds: bool = False) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            d
            for d in self.root.iterdir()
            if d.is_dir() and (include_builds or not d.name.startswith(BUILD_PREFIX))
        ]

    @staticmethod
    def _manifest(directory: Path) -> TemplateManifest | None:
        try:
            return msgspec.json.decode((directory / MANIFEST).read_bytes(), type=TemplateManifest)
        except (OSError, msgspec.DecodeError):
            return None
