"""The per-host image cache: an OCI reference becomes a read-only ext4 disk, once per digest.

On-disk layout under ``root``::

    oci-cache/                  one shared OCI layout, so images share their layer blobs
        oci-layout, index.json  index.json tags every pulled manifest by its digest hex
        blobs/sha256/<hex>
    disks/<digest hex>/         one directory per platform manifest digest
        rootfs.ext4             the image's filesystem (sparse; attached read-only as vda)
        metadata.json           name, digest, size, entrypoint, cmd, env, working dir
    refs/<registry>/<repository>/<tag>
                                the digest a tag last resolved to (lookups without a registry)
    tmp/<hex>-XXXX/             one pull's private layout and unpacked tree (removed after)

A pull (``pending`` → ``pulling`` → ``converting`` → ``ready`` | ``failed``, as in hypeman):

1. Resolve the reference to the digest of the manifest for this host's platform.
2. ``skopeo copy`` it into a private layout under ``tmp/`` whose ``blobs`` is a symlink to
   ``oci-cache/blobs``: blobs land in (and are reused from) the shared store, while each pull
   writes its own ``index.json``, so concurrent pulls never race on one index. The manifest
   is then tagged in the shared index, which is what keeps its blobs from garbage collection.
3. ``umoci unpack`` (``--rootless`` unless root; as root, file owners are kept).
4. ``mkfs.ext4 -d`` into a temporary file, renamed to ``rootfs.ext4``.
5. ``metadata.json`` is written last: its presence means the disk is complete. Anything
   without it is swept away on the next start, and a failure removes it straight away.

Every external command runs through :func:`run_command` (``anyio.run_process``, so the child
is always reaped) under a timeout. Two pulls of one digest in this process do the work once;
pulls of different digests run concurrently, bounded by a capacity limiter.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import ipaddress
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec

from schemas.api import ImageStatus
from schemas.errors import BadRequest, Conflict, InsufficientStorage, NotFound, VmfleetError
from schemas.references import ImageRef, normalize_reference
from worker.storage import disk_full, write_atomic

__all__ = [
    "CommandFailed",
    "ImageCache",
    "ImageInfo",
    "RegistryUnavailable",
    "Runner",
    "StatusCallback",
    "Timeouts",
    "run_command",
    "uses_plain_http",
]

MIB = 1 << 20
_BLOCK = 4096
_INODE_BYTES = 256

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

_INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
_REF_NAME = "org.opencontainers.image.ref.name"
# What skopeo prints when the registry answered but has no such repository or tag (a
# status code "404" only as a word of its own: skopeo's messages hold paths and temp names).
_NOT_FOUND_MARKERS = ("manifest unknown", "name unknown", "not found")
_NOT_FOUND_STATUS = re.compile(r"\b404\b")
# What skopeo prints when this host, not the registry, failed it.
_DENIED_MARKERS = ("denied", "unauthorized", "authentication required")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RegistryUnavailable(VmfleetError):
    """The registry could not be reached or did not answer properly (retrying may help)."""

    status = 502
    code = "registry_unavailable"
    retryable = True


class CommandFailed(Exception):
    """An external command exited non-zero or ran past its timeout."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        outcome = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{Path(argv[0]).name} {outcome}: {_last_lines(stderr)}")

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def uses_plain_http(registry: str, insecure_registries: frozenset[str] = frozenset()) -> bool:
    """Loopback registries, and those the operator lists as insecure, skip TLS verification."""
    host = _registry_host(registry)
    return _is_loopback(host) or registry in insecure_registries or host in insecure_registries


def _registry_host(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.partition(":")[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# What the cache hands out
# --------------------------------------------------------------------------------------------


class _Metadata(msgspec.Struct, kw_only=True):
    """``metadata.json``: everything but the disk's location, so the cache can be moved."""

    name: str
    digest: str
    size_bytes: int
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    working_dir: str | None = None
    created_at: datetime


class ImageInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A ready image on this host. Empty entrypoint/cmd/env mean the config has none."""

    name: str
    digest: str
    size_bytes: int
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    working_dir: str | None = None
    created_at: datetime
    disk: Path

    @property
    def has_command(self) -> bool:
        """Whether the image says what to run (CREATE refuses an image without it)."""
        return bool(self.entrypoint or self.cmd)


StatusCallback = Callable[[str], None]
"""Called with ``pending``, ``pulling``, ``converting``, ``ready``, or ``failed: <error>``."""

Runner = Callable[[Sequence[str], float], Awaitable[bytes]]
"""Runs a command with a timeout, returns its stdout, raises :class:`CommandFailed`."""


async def run_command(argv: Sequence[str], timeout_s: float) -> bytes:
    """Run ``argv`` to completion (always reaped, killed on timeout or cancellation)."""
    try:
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process(list(argv), check=False, stdin=subprocess.DEVNULL)
    except TimeoutError:
        raise CommandFailed(argv, None, f"no result after {timeout_s:g}s") from None
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr.decode(errors="replace"))
    return done.stdout


@dataclass
class _Flight:
    """One pull in progress; later callers for the same digest wait for it."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: VmfleetError | None = None


@dataclass(frozen=True)
class Timeouts:
    resolve_s: float = 30.0
    copy_s: float = 1800.0
    unpack_s: float = 900.0
    mkfs_s: float = 900.0
    gc_s: float = 300.0


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


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
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._layout_lock = anyio.Lock()
        self._in_flight: dict[str, _Flight] = {}
        self._prepare_directories()

    @property
    def layout(self) -> Path:
        return self.root / "oci-cache"

    # -- reads ---------------------------------------------------------------------------------

    def get(self, ref_or_digest: str) -> ImageInfo | None:
        """A ready image by ``sha256:…`` digest or by reference (tags as last resolved here).

        Raises ``BadRequest(code="invalid_name")`` for a malformed reference.
        """
        if _DIGEST.fullmatch(ref_or_digest):
            return self._read_metadata(ref_or_digest)
        ref = normalize_reference(ref_or_digest)
        digest = ref.digest or self._tagged_digest(ref)
        info = self._read_metadata(digest) if digest else None
        return msgspec.structs.replace(info, name=ref.name) if info else None

    def list(self) -> builtins.list[ImageInfo]:
        """Every ready image, oldest first."""
        disks = self.root / "disks"
        found = (self._read_metadata(f"sha256:{d.name}") for d in sorted(disks.iterdir()))
        return sorted((info for info in found if info), key=lambda info: info.created_at)

    # -- pull ----------------------------------------------------------------------------------

    async def resolve_digest(self, reference: str | ImageRef) -> str:
        """The digest of the manifest this host would run (an index resolved to its platform).

        A digest reference already cached here is answered without asking the registry.
        """
        ref = reference if isinstance(reference, ImageRef) else normalize_reference(reference)
        if ref.digest is not None and self._read_metadata(ref.digest) is not None:
            return ref.digest
        raw = await self._skopeo(ref, "inspect", "--raw", *self._tls(ref, "--tls-verify"))
        return self._platform_digest(ref, raw)

    async def pull(self, reference: str, on_status: StatusCallback | None = None) -> ImageInfo:
        """The image's disk on this host: pulled and converted unless it is here already."""
        notify = on_status or _ignore_status
        ref = normalize_reference(reference)
        digest = await self._resolve_or_last_known(ref)
        while True:
            cached = self._read_metadata(digest)
            if cached is not None:
                self._remember_tag(ref, digest)
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
        if not _DIGEST.fullmatch(digest):
            raise BadRequest(f"invalid image digest: {digest!r}", code="invalid_name")
        if digest in self._in_flight:
            raise Conflict(f"image {digest} is being pulled on this host")
        if self._read_metadata(digest) is None:
            raise NotFound("image not found")
        if in_use is not None and in_use(digest):
            raise Conflict(f"image {digest} is used by an instance on this host")
        self._forget_tags(digest)
        await _remove_tree(self._disk_dir(digest))
        async with self._layout_lock:
            self._untag_in_layout(digest)
            await self._collect_garbage()

    # -- one pull, steps -----------------------------------------------------------------------

    async def _resolve_or_last_known(self, ref: ImageRef) -> str:
        """The registry's answer; if the registry is down, the digest this tag had here."""
        try:
            return await self.resolve_digest(ref)
        except RegistryUnavailable:
            last_known = self._tagged_digest(ref)
            if last_known is None or self._read_metadata(last_known) is None:
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
        self._remember_tag(ref, digest)
        notify(ImageStatus.READY)
        return info

    async def _pull_and_convert(
        self, ref: ImageRef, digest: str, notify: StatusCallback
    ) -> ImageInfo:
        hexdigest = _hex(digest)
        work = Path(tempfile.mkdtemp(prefix=f"{hexdigest[:12]}-", dir=self.root / "tmp"))
        target = self._disk_dir(digest)
        complete = False
        try:
            # 1. Blobs into the shared store, the manifest tagged in the shared index.
            notify(ImageStatus.PULLING)
            await self._wait_for_garbage_collection()
            private = self._private_layout(work / "layout")
            await self._copy(ref, digest, private)
            descriptor = _tagged_descriptor(private, hexdigest)
            async with self._layout_lock:
                self._tag_in_layout(hexdigest, descriptor)
            # 2. The filesystem tree, as the image's owners had it (when we are root).
            await self._unpack(private, hexdigest, work / "bundle")
            config = _image_config(private, descriptor)
            self._check_platform(ref, config)
            # 3. The disk, then the metadata that marks it complete.
            notify(ImageStatus.CONVERTING)
            target.mkdir(parents=True, exist_ok=True)
            disk = target / "rootfs.ext4"
            await self._make_disk(work / "bundle" / "rootfs", disk)
            meta = _metadata(ref, digest, disk.stat().st_size, config)
            write_atomic(target / "metadata.json", msgspec.json.encode(meta))
            complete = True
            return _info(meta, disk)
        finally:
            with anyio.CancelScope(shield=True):
                await _remove_tree(work)
                if not complete:
                    await _remove_tree(target)

    async def _copy(self, ref: ImageRef, digest: str, private: Path) -> None:
        tls = self._tls(ref, "--src-tls-verify")
        destination = f"oci:{private}:{_hex(digest)}"
        await self._skopeo(ref, "copy", "--quiet", *tls, ref.at(digest), destination)

    async def _unpack(self, layout: Path, tag: str, bundle: Path) -> None:
        rootless = ["--rootless"] if os.geteuid() != 0 else []
        argv = ["umoci", "unpack", *rootless, "--image", f"{layout}:{tag}", str(bundle)]
        await self._run(argv, self.timeouts.unpack_s)

    async def _make_disk(self, tree: Path, disk: Path) -> None:
        """``mkfs.ext4 -d`` into a temporary file, renamed into place when complete."""
        size, inodes = await anyio.to_thread.run_sync(_disk_geometry, tree)
        partial = disk.with_name(f".{disk.name}.partial")
        argv = [
            *("mkfs.ext4", "-q", "-F", "-b", str(_BLOCK), "-O", "^has_journal"),
            *("-m", "0", "-N", str(inodes), "-d", str(tree)),
            *(str(partial), f"{size // 1024}k"),
        ]
        try:
            await self._run(argv, self.timeouts.mkfs_s)
            partial.replace(disk)
        finally:
            partial.unlink(missing_ok=True)

    def _check_platform(self, ref: ImageRef, config: dict[str, Any]) -> None:
        arch, os_name = config.get("architecture"), config.get("os")
        if (arch and arch != self.arch) or (os_name and os_name != self.os_name):
            raise BadRequest(
                f"image {ref.name} is built for {os_name}/{arch}, "
                f"this host runs {self.os_name}/{self.arch}",
                code="unsupported_platform",
            )

    # -- registry ------------------------------------------------------------------------------

    async def _skopeo(self, ref: ImageRef, *args: str) -> bytes:
        timeout = self.timeouts.resolve_s if args[0] == "inspect" else self.timeouts.copy_s
        platform_flags = ("--override-os", self.os_name, "--override-arch", self.arch)
        source = () if args[0] == "copy" else (ref.source,)
        try:
            return await self._run(["skopeo", *platform_flags, *args, *source], timeout)
        except CommandFailed as exc:
            raise _registry_error(ref, exc) from exc

    def _tls(self, ref: ImageRef, flag: str) -> builtins.list[str]:
        verify = not uses_plain_http(ref.registry, self.insecure_registries)
        return [f"{flag}={str(verify).lower()}"]

    def _platform_digest(self, ref: ImageRef, raw: bytes) -> str:
        try:
            manifest = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise RegistryUnavailable(
                f"registry sent an unreadable manifest for {ref.name}"
            ) from None
        if not _is_index(manifest):
            return f"sha256:{hashlib.sha256(raw).hexdigest()}"
        for entry in manifest.get("manifests") or []:
            found = entry.get("platform") or {}
            if found.get("os") == self.os_name and found.get("architecture") == self.arch:
                return _checked_digest(ref, entry.get("digest"))
        raise BadRequest(
            f"image {ref.name} has no {self.os_name}/{self.arch} manifest",
            code="unsupported_platform",
        )

    # -- files ---------------------------------------------------------------------------------

    def _prepare_directories(self) -> None:
        """Create the tree, and drop what an interrupted pull left (no metadata = not ready)."""
        for sub in ("disks", "refs", "tmp", "oci-cache/blobs/sha256"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for disk_dir in (self.root / "disks").iterdir():
            if not (disk_dir / "metadata.json").exists():
                shutil.rmtree(disk_dir, ignore_errors=True)

    def _disk_dir(self, digest: str) -> Path:
        return self.root / "disks" / _hex(digest)

    def _read_metadata(self, digest: str) -> ImageInfo | None:
        directory = self._disk_dir(digest)
        try:
            raw = (directory / "metadata.json").read_bytes()
        except FileNotFoundError:
            return None
        return _info(msgspec.json.decode(raw, type=_Metadata), directory / "rootfs.ext4")

    def _tag_file(self, ref: ImageRef) -> Path | None:
        if ref.tag is None or ref.digest is not None:
            return None
        # No repository component starts with "_", so "_tags" never collides with one.
        return self.root / "refs" / ref.registry / ref.repository / "_tags" / ref.tag

    def _tagged_digest(self, ref: ImageRef) -> str | None:
        path = self._tag_file(ref)
        try:
            return path.read_text().strip() if path else None
        except FileNotFoundError:
            return None

    def _remember_tag(self, ref: ImageRef, digest: str) -> None:
        path = self._tag_file(ref)
        if path is not None and self._tagged_digest(ref) != digest:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, digest.encode())

    def _forget_tags(self, digest: str) -> None:
        for path in (self.root / "refs").rglob("*"):
            if path.is_file() and path.read_text().strip() == digest:
                path.unlink()

    def _private_layout(self, path: Path) -> Path:
        path.mkdir()
        (path / "blobs").symlink_to(self.layout / "blobs")
        return path

    def _layout_index(self) -> builtins.list[dict[str, Any]]:
        try:
            index = msgspec.json.decode((self.layout / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        return list(index.get("manifests") or [])

    def _write_layout_index(self, manifests: builtins.list[dict[str, Any]]) -> None:
        """The shared index (and the layout marker, written with the first tag)."""
        if not (self.layout / "oci-layout").exists():
            write_atomic(self.layout / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        index = {"schemaVersion": 2, "manifests": manifests}
        write_atomic(self.layout / "index.json", msgspec.json.encode(index))

    def _tag_in_layout(self, tag: str, descriptor: dict[str, Any]) -> None:
        others = [d for d in self._layout_index() if _tag_of(d) != tag]
        self._write_layout_index([*others, descriptor])

    def _untag_in_layout(self, digest: str) -> None:
        kept = [d for d in self._layout_index() if _tag_of(d) != _hex(digest)]
        self._write_layout_index(kept)

    async def _wait_for_garbage_collection(self) -> None:
        """Blobs a pull writes are untagged until it tags them: never copy while gc runs.

        ``_collect_garbage`` runs only with the layout lock held and no pull registered; a
        pull registers before it gets here, so once it holds the lock gc cannot start.
        """
        async with self._layout_lock:
            pass

    async def _collect_garbage(self) -> None:
        """Drop blobs no tag references, unless a pull (whose blobs are untagged) is running."""
        if self._in_flight or not (self.layout / "index.json").exists():
            return
        with contextlib.suppress(CommandFailed):
            await self._run(["umoci", "gc", "--layout", str(self.layout)], self.timeouts.gc_s)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def host_arch() -> str:
    """This machine's architecture in OCI terms (``amd64``, ``arm64``, …)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _ignore_status(status: str) -> None:
    pass


def _hex(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.removeprefix("sha256:")


def _checked_digest(ref: ImageRef, digest: Any) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise RegistryUnavailable(f"registry sent an index with a bad digest for {ref.name}")
    return digest


def _is_index(manifest: Any) -> bool:
    """An OCI index or Docker manifest list (OCI allows the index to omit ``mediaType``)."""
    if not isinstance(manifest, dict):
        return False
    media_type = manifest.get("mediaType")
    return media_type in _INDEX_TYPES or (media_type is None and "manifests" in manifest)


def _tag_of(descriptor: dict[str, Any]) -> str | None:
    annotations = descriptor.get("annotations") or {}
    tag = annotations.get(_REF_NAME)
    return str(tag) if tag is not None else None


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[-count:])


def _skopeo_reason(stderr: str) -> str:
    """The message inside skopeo's ``level=fatal msg="…"`` line, or the stderr tail."""
    found = re.search(r'msg="((?:[^"\\]|\\.)*)"', stderr)
    if found is None:
        return _last_lines(stderr)
    message = found.group(1).replace('\\"', '"')
    return re.sub(r'^Error parsing image name "[^"]*": ', "", message)


def _registry_error(ref: ImageRef, failure: CommandFailed) -> VmfleetError:
    if failure.timed_out:
        return RegistryUnavailable(
            f"registry {ref.registry} did not answer for {ref.name}: {failure.stderr}"
        )
    reason = _skopeo_reason(failure.stderr)
    if disk_full(reason):
        return InsufficientStorage(f"pulling {ref.name} failed on this host: {reason}")
    # The registry's own address must not pass for a 404 (think of port 40404).
    text = reason.replace(ref.registry, "<registry>").lower()
    if any(marker in text for marker in _NOT_FOUND_MARKERS) or _NOT_FOUND_STATUS.search(text):
        return NotFound("image not found")
    if any(marker in text for marker in _DENIED_MARKERS):
        return NotFound(f"image not found: {ref.registry} denied access to {ref.repository}")
    return RegistryUnavailable(f"registry {ref.registry} unavailable for {ref.name}: {reason}")


def _as_vmfleet_error(ref: ImageRef, exc: Exception) -> VmfleetError:
    if isinstance(exc, VmfleetError):
        return exc
    return VmfleetError(f"pulling {ref.name} failed: {exc}")


def _same_error(error: VmfleetError) -> VmfleetError:
    """A fresh copy for another waiter (one exception object must not be raised twice)."""
    copy = type(error)(error.message, code=error.code)
    copy.status = error.status
    return copy


def _tagged_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    index = msgspec.json.decode((layout / "index.json").read_bytes())
    for descriptor in index.get("manifests") or []:
        if _tag_of(descriptor) == tag:
            return dict(descriptor)
    raise VmfleetError(f"skopeo left no manifest tagged {tag} in {layout}")


def _read_blob(layout: Path, digest: str) -> Any:
    return msgspec.json.decode((layout / "blobs" / "sha256" / _hex(digest)).read_bytes())


def _image_config(layout: Path, descriptor: dict[str, Any]) -> dict[str, Any]:
    """The OCI image config (architecture, os, and ``config``) of a tagged manifest."""
    manifest = _read_blob(layout, descriptor["digest"])
    config = _read_blob(layout, manifest["config"]["digest"])
    return config if isinstance(config, dict) else {}


def _metadata(ref: ImageRef, digest: str, size: int, image_config: dict[str, Any]) -> _Metadata:
    """entrypoint, cmd, env (split at the first ``=``) and working dir from the config."""
    config = image_config.get("config") or {}
    env = {
        key: value for key, _, value in (item.partition("=") for item in config.get("Env") or [])
    }
    return _Metadata(
        name=ref.name,
        digest=digest,
        size_bytes=size,
        entrypoint=list(config.get("Entrypoint") or []),
        cmd=list(config.get("Cmd") or []),
        env=env,
        working_dir=config.get("WorkingDir") or None,
        created_at=datetime.now(UTC),
    )


def _info(meta: _Metadata, disk: Path) -> ImageInfo:
    return ImageInfo(
        name=meta.name,
        digest=meta.digest,
        size_bytes=meta.size_bytes,
        entrypoint=meta.entrypoint,
        cmd=meta.cmd,
        env=meta.env,
        working_dir=meta.working_dir,
        created_at=meta.created_at,
        disk=disk,
    )


def _disk_geometry(tree: Path) -> tuple[int, int]:
    """(disk bytes, inode count) for a tree: hypeman's content x 1.5, at least 10 MiB.

    Content counts whole 4 KiB blocks per file and directory plus an inode per entry, so
    trees of many small files still fit; the inode count is set from the tree too.
    """
    content, entries, seen = 0, 1, set()
    for directory, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            info = os.lstat(os.path.join(directory, name))
            entries += 1
            if info.st_ino in seen:
                continue
            seen.add(info.st_ino)
            if not _is_fast_symlink(info):
                content += -(-info.st_size // _BLOCK) * _BLOCK
    content += entries * _INODE_BYTES + _BLOCK
    size = max(10 * MIB, -(-(content * 3 // 2) // MIB) * MIB)
    return size, entries + entries // 8 + 64


def _is_fast_symlink(info: os.stat_result) -> bool:
    """Symlinks of up to 59 bytes live inside the inode and take no block."""
    return (info.st_mode & 0o170000) == 0o120000 and info.st_size < 60


async def _remove_tree(path: Path) -> None:
    if path.exists():
        await anyio.to_thread.run_sync(shutil.rmtree, path, True)
