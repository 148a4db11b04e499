"""The per-host image cache: an OCI reference becomes a read-only ext4 disk, once per digest.

On-disk layout under ``root``::

    oci-cache/          the shared OCI layout (``layout.OciLayout``)
    disks/<hex>/        one ready image per platform manifest digest (``disk.DiskStore``)
    refs/               the digest each tag last resolved to (``layout.TagFiles``)
    tmp/<hex>-XXXX/     one pull's private layout and unpacked tree (removed after)

A pull (``pending`` → ``pulling`` → ``converting`` → ``ready`` | ``failed``, as in hypeman):

1. Resolve the reference to the digest of the manifest for this host's platform
   (``registry.Registry``).
2. ``skopeo copy`` it into a private layout under ``tmp/`` that shares the blob store, then
   tag the manifest in the shared index, which keeps its blobs from garbage collection.
3. ``umoci unpack``, ``mkfs.ext4 -d``, and ``metadata.json`` last (``disk``). A failure
   removes the disk directory straight away; a crash leaves it for the next start's sweep.

Every external command runs through one runner (``worker.run.run_command`` unless a test
passes another) under a time bound. Two pulls of one digest in this process do the work
once; pulls of different digests run concurrently, bounded by a capacity limiter.
"""

from __future__ import annotations

import builtins
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from schemas.api import ImageStatus
from schemas.errors import BadRequest, Conflict, NotFound, VmfleetError
from schemas.references import ImageRef, normalize_reference
from worker.images.base import DIGEST, Runner, Timeouts, digest_hex, remove_tree
from worker.images.disk import DiskStore, ImageInfo, make_disk, unpack
from worker.images.layout import OciLayout, TagFiles, image_config, tagged_descriptor
from worker.images.registry import Registry, RegistryUnavailable, host_arch
from worker.run import run_command

__all__ = ["ImageCache", "StatusCallback"]

StatusCallback = Callable[[str], None]
"""Called with ``pending``, ``pulling``, ``converting``, ``ready``, or ``failed: <error>``."""


@dataclass
class _Flight:
    """One pull in progress; later callers for the same digest wait for it."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: VmfleetError | None = None


class ImageCache:
    """Images of one host. One instance per ``root``: creating one sweeps incomplete pulls."""

    def __init__(
        self,
        root: Path,
        insecure_registries: frozenset[str] = frozenset(),
        *,
        concurrency: int = 2,
        os_name: str = "linux",
        arch: str | None = None,
        timeouts: Timeouts | None = None,
        runner: Runner = run_command,
    ) -> None:
        self.root = root
        self.insecure_registries = insecure_registries
        self.os_name = os_name
        self.arch = arch or host_arch()
        self.timeouts = timeouts or Timeouts()
        self._run = runner
        self._registry = Registry(
            insecure_registries,
            os_name=self.os_name,
            arch=self.arch,
            timeouts=self.timeouts,
            runner=runner,
        )
        self._layout = OciLayout(root / "oci-cache", runner=runner, gc_timeout_s=self.timeouts.gc_s)
        self._disks = DiskStore(root / "disks")
        self._tags = TagFiles(root / "refs")
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._in_flight: dict[str, _Flight] = {}
        self._sweep()

    @property
    def layout(self) -> Path:
        return self._layout.path

    # -- reads ---------------------------------------------------------------------------------

    def get(self, ref_or_digest: str) -> ImageInfo | None:
        """A ready image by ``sha256:…`` digest or by reference (tags as last resolved here).

        Raises ``BadRequest(code="invalid_name")`` for a malformed reference.
        """
        if DIGEST.fullmatch(ref_or_digest):
            return self._disks.read(ref_or_digest)
        ref = normalize_reference(ref_or_digest)
        digest = ref.digest or self._tags.get(ref)
        info = self._disks.read(digest) if digest else None
        return msgspec.structs.replace(info, name=ref.name) if info else None

    def list(self) -> builtins.list[ImageInfo]:
        """Every ready image, oldest first."""
        return self._disks.ready()

    # -- pull ----------------------------------------------------------------------------------

    async def resolve_digest(self, reference: str | ImageRef) -> str:
        """The digest of the manifest this host would run (an index resolved to its platform).

        A digest reference already cached here is answered without asking the registry.
        """
        ref = reference if isinstance(reference, ImageRef) else normalize_reference(reference)
        if ref.digest is not None and self._disks.read(ref.digest) is not None:
            return ref.digest
        return await self._registry.platform_digest(ref)

    async def pull(self, reference: str, on_status: StatusCallback | None = None) -> ImageInfo:
        """The image's disk on this host: pulled and converted unless it is here already."""
        notify = on_status or _ignore_status
        ref = normalize_reference(reference)
        digest = await self._resolve_or_last_known(ref)
        while True:
            cached = self._disks.read(digest)
            if cached is not None:
                self._tags.remember(ref, digest)
                notify(ImageStatus.READY)
                return msgspec.structs.replace(cached, name=ref.name)
            flight = self._in_flight.get(digest)
            if flight is None:
                return await self._lead_pull(ref, digest, notify)
            await flight.done.wait()
            if flight.error is not None:
                notify(f"{ImageStatus.FAILED}: {flight.error.message}")
                raise _same_error(flight.error)
            # The pull we waited for was cancelled: the next round takes it over.

    async def delete(self, digest: str, *, in_use: Callable[[str], bool] | None = None) -> None:
        """Remove a ready image's disk, tags and unshared blobs; refused while in use."""
        if not DIGEST.fullmatch(digest):
            raise BadRequest(f"invalid image digest: {digest!r}", code="invalid_name")
        if digest in self._in_flight:
            raise Conflict(f"image {digest} is being pulled on this host")
        if self._disks.read(digest) is None:
            raise NotFound("image not found")
        if in_use is not None and in_use(digest):
            raise Conflict(f"image {digest} is used by an instance on this host")
        self._tags.forget(digest)
        await self._disks.remove(digest)
        # Blobs of a pull in progress are untagged until it ends: collect only without one.
        await self._layout.untag(digest, may_collect=lambda: not self._in_flight)

    # -- one pull, steps -----------------------------------------------------------------------

    async def _resolve_or_last_known(self, ref: ImageRef) -> str:
        """The registry's answer; if the registry is down, the digest this tag had here."""
        try:
            return await self.resolve_digest(ref)
        except RegistryUnavailable:
            last_known = self._tags.get(ref)
            if last_known is None or self._disks.read(last_known) is None:
                raise
            return last_known

    async def _lead_pull(self, ref: ImageRef, digest: str, notify: StatusCallback) -> ImageInfo:
        flight = self._in_flight[digest] = _Flight()
        try:
            if self._limiter.available_tokens == 0:
                notify(ImageStatus.PENDING)
            async with self._limiter:
                info = await self._pull_and_convert(ref, digest, notify)
        except Exception as exc:
            flight.error = _as_vmfleet_error(ref, exc)
            notify(f"{ImageStatus.FAILED}: {flight.error.message}")
            if flight.error is exc:
                raise
            raise flight.error from exc
        finally:
            del self._in_flight[digest]
            flight.done.set()
        self._tags.remember(ref, digest)
        notify(ImageStatus.READY)
        return info

    async def _pull_and_convert(
        self, ref: ImageRef, digest: str, notify: StatusCallback
    ) -> ImageInfo:
        hexdigest = digest_hex(digest)
        work = Path(tempfile.mkdtemp(prefix=f"{hexdigest[:12]}-", dir=self.root / "tmp"))
        target = self._disks.directory(digest)
        complete = False
        try:
            # 1. Blobs into the shared store, the manifest tagged in the shared index.
            notify(ImageStatus.PULLING)
            await self._layout.wait_for_garbage_collection()
            private = self._layout.private(work / "layout")
            await self._registry.copy(ref, digest, private)
            descriptor = tagged_descriptor(private, hexdigest)
            await self._layout.tag(digest, descriptor)
            # 2. The filesystem tree, as the image's owners had it (when we are root).
            await unpack(self._run, private, hexdigest, work / "bundle", self.timeouts.unpack_s)
            config = image_config(private, descriptor)
            self._check_platform(ref, config)
            # 3. The disk, then the metadata that marks it complete.
            notify(ImageStatus.CONVERTING)
            target.mkdir(parents=True, exist_ok=True)
            disk = target / "rootfs.ext4"
            await make_disk(self._run, work / "bundle" / "rootfs", disk, self.timeouts.mkfs_s)
            info = self._disks.complete(ref, digest, disk, config)
            complete = True
            return info
        finally:
            with anyio.CancelScope(shield=True):
                await remove_tree(work)
                if not complete:
                    await remove_tree(target)

    def _check_platform(self, ref: ImageRef, config: dict[str, Any]) -> None:
        arch, os_name = config.get("architecture"), config.get("os")
        if (arch and arch != self.arch) or (os_name and os_name != self.os_name):
            raise BadRequest(
                f"image {ref.name} is built for {os_name}/{arch}, "
                f"this host runs {self.os_name}/{self.arch}",
                code="unsupported_platform",
            )

    def _sweep(self) -> None:
        """Drop what an interrupted pull left: its work tree, and a disk without metadata."""
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self._disks.sweep_incomplete()


def _ignore_status(status: str) -> None:
    pass


def _as_vmfleet_error(ref: ImageRef, exc: Exception) -> VmfleetError:
    if isinstance(exc, VmfleetError):
        return exc
    return VmfleetError(f"pulling {ref.name} failed: {exc}")


def _same_error(error: VmfleetError) -> VmfleetError:
    """A fresh copy for another waiter (one exception object must not be raised twice)."""
    copy = type(error)(error.message, code=error.code)
    copy.status = error.status
    return copy
