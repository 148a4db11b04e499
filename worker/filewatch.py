"""Waking file followers when their file changes, through inotify instead of polling.

One :class:`FileWatcher` per process holds one inotify instance (the kernel allows a user
only 128 of them) and one watch per *directory*, shared by every follower of every file in
it: a directory watch reports writes to the files inside it by name, and also their
creation, renaming and deletion, so rotation (a new file under the old name) needs no
second watch. The watcher's reader task fans each event out to the followers of that name.
An idle follower then costs nothing: no timer, no stat, no read until its file changes.

A follower subscribes *before* reading to the end of its file, so a write that lands
while it reads is never missed: it only makes the next :meth:`Subscription.wait` return
at once. A directory that cannot be watched (not there yet, or out of watches) falls
back to polling it, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import anyio

# No type information ships with it (a ctypes wrapper of the three system calls).
from inotify_simple import INotify  # type: ignore[import-untyped]
from inotify_simple import flags as in_flags

__all__ = ["FileWatcher", "Subscription"]

log = logging.getLogger(__name__)

#: What a follower has to look at again: its file written, truncated, replaced or removed.
_FILE_EVENTS: Final = (
    in_flags.MODIFY
    | in_flags.ATTRIB
    | in_flags.CREATE
    | in_flags.DELETE
    | in_flags.MOVED_FROM
    | in_flags.MOVED_TO
    | in_flags.CLOSE_WRITE
)
#: The directory itself went away: nothing in it will be written again.
_DIR_GONE: Final = in_flags.DELETE_SELF | in_flags.MOVE_SELF | in_flags.IGNORED
_WATCH_MASK: Final = _FILE_EVENTS | in_flags.DELETE_SELF | in_flags.MOVE_SELF | in_flags.ONLYDIR
#: How often a follower whose directory has no watch looks at its file.
_FALLBACK_POLL_S: Final = 0.25


class Subscription:
    """A follower's interest in one file: :meth:`wait` returns after it may have changed."""

    def __init__(self, watcher: FileWatcher, path: Path) -> None:
        self.path = path
        self._watcher = watcher
        self._changed = True  # the file's state before subscribing is unknown: look at it
        self._wakeup = anyio.Event()
        #: The file's directory is gone (the instance was deleted): no more lines will come.
        self.gone = False
        #: No inotify watch covers the file: :meth:`wait` polls.
        self.polling = False

    def notify(self, gone: bool = False) -> None:
        self._changed = True
        self.gone = self.gone or gone
        self._wakeup.set()

    async def wait(self) -> None:
        """Return once the file may have changed since the last call."""
        while not self._changed:
            if self.polling:
                await anyio.sleep(_FALLBACK_POLL_S)
                self._watcher.retry_watch(self)
                break
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        self._changed = False


class _Directory:
    def __init__(self, path: Path, wd: int | None) -> None:
        self.path = path
        self.wd = wd
        self.by_name: dict[str, set[Subscription]] = {}

    def subscriptions(self) -> Iterator[Subscription]:
        for subs in self.by_name.values():
            yield from subs


class FileWatcher:
    """One inotify instance for the process; :meth:`run` must be running to deliver events."""

    def __init__(self) -> None:
        self._inotify = INotify(nonblocking=True)
        self._dirs: dict[Path, _Directory] = {}
        self._by_wd: dict[int, _Directory] = {}

    @property
    def watches(self) -> int:
        """Directories watched right now (one inotify watch each)."""
        return len(self._by_wd)

    @contextlib.contextmanager
    def subscribe(self, path: Path) -> Iterator[Subscription]:
        """Follow ``path`` for as long as the ``with`` block lasts."""
        subscription = Subscription(self, path)
        directory = self._dirs.get(path.parent) or self._watch_directory(path.parent)
        directory.by_name.setdefault(path.name, set()).add(subscription)
        subscription.polling = directory.wd is None
        try:
            yield subscription
        finally:
            self._unsubscribe(directory, subscription)

    def retry_watch(self, subscription: Subscription) -> None:
        """A polling subscription's directory may exist by now: watch it if so."""
        directory = self._dirs.get(subscription.path.parent)
        if directory is None:
            return
        if directory.wd is None:
            self._add_watch(directory, quiet=True)
        if directory.wd is not None:
            for sub in directory.subscriptions():
                sub.polling = False
                sub.notify()

    async def run(self) -> None:
        """Deliver events until cancelled; closes the inotify instance at the end."""
        try:
            while True:
                await anyio.wait_readable(self._inotify.fileno())
                for event in self._inotify.read(timeout=0):
                    self._dispatch(event.wd, event.mask, event.name)
        finally:
            self._inotify.close()

    def _dispatch(self, wd: int, mask: int, name: str) -> None:
        if mask & in_flags.Q_OVERFLOW:  # events were lost: everybody looks again
            for each in self._dirs.values():
                for sub in each.subscriptions():
                    sub.notify()
            return
        directory = self._by_wd.get(wd)
        if directory is None:
            return
        if mask & _DIR_GONE:
            self._by_wd.pop(wd, None)
            directory.wd = None
            for sub in directory.subscriptions():
                sub.notify(gone=True)
            return
        for sub in directory.by_name.get(name, ()):
            sub.notify()

    def _watch_directory(self, path: Path) -> _Directory:
        directory = self._dirs[path] = _Directory(path, None)
        self._add_watch(directory)
        return directory

    def _add_watch(self, directory: _Directory, quiet: bool = False) -> None:
        try:
            wd = self._inotify.add_watch(directory.path, _WATCH_MASK)
        except OSError as exc:
            # A directory not made yet (or just removed) is polled quietly until it is there.
            if not quiet and exc.errno != errno.ENOENT:
                hint = " (raise fs.inotify.max_user_watches)" if exc.errno == errno.ENOSPC else ""
                log.warning("cannot watch %s, polling it: %s%s", directory.path, exc, hint)
            return
        directory.wd = wd
        self._by_wd[wd] = directory

    def _unsubscribe(self, directory: _Directory, subscription: Subscription) -> None:
        subs = directory.by_name.get(subscription.path.name, set())
        subs.discard(subscription)
        if not subs:
            directory.by_name.pop(subscription.path.name, None)
        if directory.by_name:
            return
        del self._dirs[directory.path]
        if directory.wd is not None:
            self._by_wd.pop(directory.wd, None)
            if self._inotify.closed:  # the watcher stopped first: its watches went with it
                return
            with contextlib.suppress(OSError):  # the directory may be gone already
                self._inotify.rm_watch(directory.wd)
