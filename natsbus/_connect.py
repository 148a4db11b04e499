"""Opening a NATS connection that rides out server restarts and cluster failover."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import nats
from nats.aio.client import Client
from nats.errors import NoServersError

__all__ = ["BusOptions", "connect"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BusOptions:
    """How to reach NATS. Several URLs name several servers of one cluster."""

    urls: tuple[str, ...]
    name: str = "vmfleet"
    credentials_file: str | None = None
    tls_ca_file: str | None = None
    connect_timeout_s: float = 5.0
    #: How long the *first* connection may take before start-up fails with a clear error.
    first_connect_timeout_s: float = 30.0
    on_reconnect: Callable[[], None] | None = field(default=None, compare=False)


async def connect(options: BusOptions) -> Client:
    """Connect, retrying forever on later disconnects (a worker must outlive a NATS restart).

    The first connection attempt also retries, for a bounded time, so that a component
    started beside its NATS server does not lose the race against it.
    """

    async def reconnected() -> None:
        log.warning("reconnected to NATS")
        if options.on_reconnect is not None:
            options.on_reconnect()

    async def disconnected() -> None:
        log.warning("disconnected from NATS; reconnecting")

    async def error(exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    kwargs: dict[str, object] = {}
    if options.credentials_file:
        kwargs["user_credentials"] = options.credentials_file
    if options.tls_ca_file:
        import ssl

        kwargs["tls"] = ssl.create_default_context(cafile=options.tls_ca_file)
    with anyio.fail_after(options.first_connect_timeout_s):
        while True:
            try:
                return await _connect(options, reconnected, disconnected, error, kwargs)
            except (OSError, NoServersError) as exc:
                log.info("NATS not reachable yet (%s); retrying", exc)
                await anyio.sleep(0.5)


async def _connect(
    options: BusOptions,
    reconnected: Callable[[], Awaitable[None]],
    disconnected: Callable[[], Awaitable[None]],
    error: Callable[[Exception], Awaitable[None]],
    kwargs: dict[str, object],
) -> Client:
    return await nats.connect(
        servers=list(options.urls),
        name=options.name,
        connect_timeout=options.connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        reconnected_cb=reconnected,
        disconnected_cb=disconnected,
        error_cb=error,
        **kwargs,
    )
