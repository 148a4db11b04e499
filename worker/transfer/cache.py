"""A host's cache of fetched bundles: one fetch per bundle at a time, LRU under a budget.

Layout below the cache root (``<data dir>/transfers`` on a worker):

- ``<bundle>/``: a complete, verified bundle (renamed into place in one step);
- ``.partial/<bundle>/``: a fetch in progress, or one broken off (resumed by the next);
- ``.used/<bundle>``: its modification time is the bundle's last use (the LRU order);
- ``.holders/<bundle>/<holder>``: something on this host still needs the bundle (a fork
  whose disks are backed by its files): never evicted while one is there.

A fetch of a bundle while another fetch of it runs waits for that one and shares its
result (or its error): the store is read once per bundle per host. Eviction runs after
each fetch: least recently used bundles go, until the cache is within its budget, except
those in use right now or held. The budget counts disk blocks, so a sparse memory file
counts what it really takes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from nats.js.object_store import ObjectStore

from worker.transfer.errors import BundleNotFound
from worker.transfer.fetch import FetchStats, fetch_into
from worker.transfer.names import check_bundle
from worker.transfer.upload import DEFAULT_PARALLEL, read_manifest

__all__ = ["HostCache"]

log = logging.getLogger(__name__)

#: The transfers store keeps a bundle a day (natsbus Layout.transfer_ttl_s).
PARTIAL_MAX_AGE_S = 86_400.0


@dataclass
class _Flight:
    """One fetch in progress; the others asking for the bundle wait on ``done``."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None
    succeeded: bool = False


def disk_usage(path: Path) -> int:
    """Bytes of disk the files below ``path`` take (holes of sparse files excluded)."""
    total = 0
    for entry in path.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            total += entry.stat().st_blocks * 512
    return total


class HostCache:
    def __init__(
        self,
        store: ObjectStore,
        root: Path,
        budget_bytes: int,
        *,
        parallel: int = DEFAULT_PARALLEL,
        on_part: Callable[[int], None] | None = None,
        observe: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.store = store
        self.root = root
        self.budget_bytes = budget_bytes
        self.parallel = parallel
        #: Progress hook of every fetch (tests break a fetch off with it).
        self.on_part = on_part
        #: Told of every bundle this host sends or fetches: direction, bytes, seconds.
        self.observe = observe or (lambda direction, size, seconds: None)
        self.fetches = 0
        self.last_stats: FetchStats | None = None
        self._flights: dict[str, _Flight] = {}
        self._in_use: Counter[str] = Counter()
        self._last_touch_ns = 0
        for sub in (".partial", ".used", ".holders"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, bundle: str) -> Path:
        return self.root / check_bundle(bundle)

    def has(self, bundle: str) -> bool:
        return self.path(bundle).is_dir()

    async def fetch(self, bundle: str) -> Path:
        """The bundle's verified directory on this host, fetched if it is not here."""
        while True:
            if self.has(bundle):
                self._touch(bundle)
                return self.path(bundle)
            flight = self._flights.get(bundle)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            # Succeeded (loop finds it) or the fetcher was cancelled (loop takes over).
        return await self._fetch_once(bundle)

    @asynccontextmanager
    async def use(self, bundle: str) -> AsyncIterator[Path]:
        """The bundle's directory, never evicted while the block runs."""
        self._in_use[bundle] += 1
        try:
            yield await self.fetch(bundle)
        finally:
            self._in_use[bundle] -= 1
            if self._in_use[bundle] <= 0:
                del self._in_use[bundle]

    def hold(self, bundle: str, holder: str) -> None:
        """Keep the bundle until ``release(bundle, holder)``, across worker restarts."""
        check_bundle(holder)
        held = self.root / ".holders" / check_bundle(bundle)
        held.mkdir(exist_ok=True)
        (held / holder).touch()

    def release(self, bundle: str, holder: str) -> None:
        held = self.root / ".holders" / check_bundle(bundle)
        (held / check_bundle(holder)).unlink(missing_ok=True)
        if held.is_dir() and not any(held.iterdir()):
            held.rmdir()

    def take(self, bundle: str, destination: Path) -> None:
        """Move a fetched bundle out of the cache to ``destination`` (same filesystem: a
        rename), e.g. a moved instance's files into its instance directory."""
        os.rename(self.path(bundle), destination)
        (self.root / ".used" / bundle).unlink(missing_ok=True)

    def evict(self, *, keep: frozenset[str] = frozenset()) -> list[str]:
        """Remove least recently used bundles until the cache is within its budget;
        bundles in use, held, or in ``keep`` stay. Returns the evicted ones."""
        bundles = [p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        sizes = {b: disk_usage(self.root / b) for b in bundles}
        total = sum(sizes.values())
        evicted: list[str] = []
        for bundle in sorted(bundles, key=self._last_used):
            if total <= self.budget_bytes:
                break
            if bundle in keep or self._in_use[bundle] or self._held(bundle):
                continue
            shutil.rmtree(self.root / bundle)
            (self.root / ".used" / bundle).unlink(missing_ok=True)
            total -= sizes[bundle]
            evicted.append(bundle)
        if evicted:
            log.info("transfer cache over its budget: evicted %s", ", ".join(evicted))
        self._drop_abandoned_partials()
        return evicted

    def _drop_abandoned_partials(self) -> None:
        """A fetch broken off and never asked for again (its bundle expired from the store
        after a day) leaves a partial copy nothing will resume: it goes after as long."""
        now = time.time()
        for partial in (self.root / ".partial").iterdir():
            if partial.name in self._flights:
                continue
            if now - partial.stat().st_mtime > PARTIAL_MAX_AGE_S:
                shutil.rmtree(partial, ignore_errors=True)

    async def _fetch_once(self, bundle: str) -> Path:
        flight = self._flights[bundle] = _Flight()
        try:
            manifest = await read_manifest(self.store, bundle)
            if manifest is None:
                raise BundleNotFound(bundle)
            partial = self.root / ".partial" / bundle
            stats = await fetch_into(
                self.store, manifest, partial, parallel=self.parallel, on_part=self.on_part
            )
            os.rename(partial, self.path(bundle))
            self.fetches += 1
            self.last_stats = stats
            self.observe("fetched", stats.bytes_fetched, stats.seconds)
            self._touch(bundle)
            log.info(
                "fetched bundle %s: %d bytes in %.2fs (%d parts kept from an earlier try)",
                bundle,
                stats.bytes_fetched,
                stats.seconds,
                stats.parts_kept,
            )
            flight.succeeded = True
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[bundle]
            flight.done.set()
        await anyio.to_thread.run_sync(lambda: self.evict(keep=frozenset({bundle})))
        return self.path(bundle)

    def _touch(self, bundle: str) -> None:
        # Strictly increasing, so two uses within one clock tick still order.
        now = max(time.time_ns(), self._last_touch_ns + 1)
        self._last_touch_ns = now
        used = self.root / ".used" / bundle
        used.touch()
        os.utime(used, ns=(now, now))

    def _last_used(self, bundle: str) -> int:
        try:
            return (self.root / ".used" / bundle).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _held(self, bundle: str) -> bool:
        held = self.root / ".holders" / bundle
        return held.is_dir() and any(held.iterdir())
