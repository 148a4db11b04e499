"""The OCI layout every pull shares, and the tags a reference last resolved to.

``oci-cache/`` is one OCI layout, so images share their layer blobs: ``index.json`` tags
every pulled manifest by its digest hex, and a tag is what keeps a manifest's blobs from
``umoci gc``. A pull copies into a private layout whose ``blobs`` is a symlink to the shared
store — blobs land in (and are reused from) it, while each pull writes its own
``index.json``, so concurrent pulls never race on one index — and then tags the manifest in
the shared index under the layout lock.

``refs/<registry>/<repository>/_tags/<tag>`` holds the digest a tag last resolved to here,
for lookups without asking the registry (and when the registry is down).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec

from schemas.errors import VmfleetError
from schemas.references import ImageRef
from worker.images.base import Runner, digest_hex
from worker.run import CommandFailed
from worker.storage import write_atomic

__all__ = ["OciLayout", "TagFiles", "image_config", "tagged_descriptor"]

_REF_NAME: Final = "org.opencontainers.image.ref.name"


class OciLayout:
    """The shared layout at ``path``: its index, tags and garbage collection."""

    def __init__(self, path: Path, *, runner: Runner, gc_timeout_s: float) -> None:
        self.path = path
        self._run = runner
        self._gc_timeout_s = gc_timeout_s
        self._lock = anyio.Lock()
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def private(self, path: Path) -> Path:
        """A new layout at ``path`` whose blobs are the shared store's."""
        path.mkdir()
        (path / "blobs").symlink_to(self.path / "blobs")
        return path

    async def tag(self, digest: str, descriptor: dict[str, Any]) -> None:
        """Tag a copied manifest in the shared index, which keeps its blobs."""
        tag = digest_hex(digest)
        async with self._lock:
            others = [d for d in self._index() if _tag_of(d) != tag]
            self._write_index([*others, descriptor])

    async def untag(self, digest: str, *, may_collect: Callable[[], bool]) -> None:
        """Drop a manifest's tag; then, if ``may_collect()`` says so under the layout lock,
        the blobs no tag references."""
        async with self._lock:
            kept = [d for d in self._index() if _tag_of(d) != digest_hex(digest)]
            self._write_index(kept)
            if may_collect():
                await self._collect_garbage()

    def tags(self) -> list[str]:
        """The digest hex of every manifest tagged in the shared index."""
        return [tag for tag in map(_tag_of, self._index()) if tag is not None]

    async def wait_for_garbage_collection(self) -> None:
        """Blobs a pull writes are untagged until it tags them: never copy while gc runs.

        gc runs only with the layout lock held and, by the cache's word (``may_collect``),
        no pull registered; a pull registers before it gets here, so once it holds the lock gc
        cannot start.
        """
        async with self._lock:
            pass

    async def _collect_garbage(self) -> None:
        if not (self.path / "index.json").exists():
            return
        # A failed gc leaves unreferenced blobs for the next one; it fails nothing else.
        with contextlib.suppress(CommandFailed):
            await self._run(["umoci", "gc", "--layout", str(self.path)], self._gc_timeout_s)

    def _index(self) -> list[dict[str, Any]]:
        try:
            index = msgspec.json.decode((self.path / "index.json").read_bytes())
        except FileNotFoundError:
            return []
        return list(index.get("manifests") or [])

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        """The shared index (and the layout marker, written with the first tag)."""
        if not (self.path / "oci-layout").exists():
            write_atomic(self.path / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        index = {"schemaVersion": 2, "manifests": manifests}
        write_atomic(self.path / "index.json", msgspec.json.encode(index))


class TagFiles:
    """``refs/``: the digest each ``registry/repository:tag`` last resolved to here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, ref: ImageRef) -> str | None:
        path = self._file(ref)
        try:
            return path.read_text().strip() if path else None
        except FileNotFoundError:
            return None

    def remember(self, ref: ImageRef, digest: str) -> None:
        path = self._file(ref)
        if path is not None and self.get(ref) != digest:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, digest.encode())

    def forget(self, digest: str) -> None:
        """Every tag that resolved to ``digest``."""
        for path in self.root.rglob("*"):
            if path.is_file() and path.read_text().strip() == digest:
                path.unlink()

    def _file(self, ref: ImageRef) -> Path | None:
        if ref.tag is None or ref.digest is not None:
            return None
        # No repository component starts with "_", so "_tags" never collides with one.
        return self.root / ref.registry / ref.repository / "_tags" / ref.tag


def tagged_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    """The descriptor skopeo tagged ``tag`` in a (private) layout's index."""
    index = msgspec.json.decode((layout / "index.json").read_bytes())
    for descriptor in index.get("manifests") or []:
        if _tag_of(descriptor) == tag:
            return dict(descriptor)
    raise VmfleetError(f"skopeo left no manifest tagged {tag} in {layout}")


def image_config(layout: Path, descriptor: dict[str, Any]) -> dict[str, Any]:
    """The OCI image config (architecture, os, and ``config``) of a tagged manifest."""
    manifest = _read_blob(layout, descriptor["digest"])
    config = _read_blob(layout, manifest["config"]["digest"])
    return config if isinstance(config, dict) else {}


def _read_blob(layout: Path, digest: str) -> Any:
    return msgspec.json.decode((layout / "blobs" / "sha256" / digest_hex(digest)).read_bytes())


def _tag_of(descriptor: dict[str, Any]) -> str | None:
    annotations = descriptor.get("annotations") or {}
    tag = annotations.get(_REF_NAME)
    return str(tag) if tag is not None else None
