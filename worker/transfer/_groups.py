"""Task groups of parallel parts fail as one: the caller sees the first part's error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup

__all__ = ["parts_group"]


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


@asynccontextmanager
async def parts_group() -> AsyncIterator[TaskGroup]:
    """A task group whose failure is its first error itself, not an ExceptionGroup: the
    parts are one transfer, and its caller maps single errors (CorruptTransfer...)."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        raise _first(group) from None
