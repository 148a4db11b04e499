"""Opening a NATS connection that rides out server restarts and cluster failover.

Authentication (user and password, a token, or a ``.creds`` file) and TLS (the CA that
signed the servers' certificates, and a client certificate where the server asks for one)
come from :class:`BusOptions`. A server that answers but refuses the connection (bad
credentials, an untrusted certificate) is not "not up yet": the first connection fails at
once with :class:`BusRefused`, whose message names the setting to fix.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError

__all__ = [
    "DEFAULT_INBOX_PREFIX",
    "BusOptions",
    "BusRefused",
    "PublishDenials",
    "close",
    "connect",
    "kv_subject",
    "tls_context",
]

log = logging.getLogger(__name__)

DEFAULT_INBOX_PREFIX = "_INBOX"

_AUTH_REFUSALS = ("authorization violation", "authentication expired", "authentication revoked")


class BusRefused(Exception):
    """NATS answered but will not take this connection as configured; retrying cannot help."""


_PUBLISH_DENIED = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


def kv_subject(bucket: str, key: str) -> str:
    """The subject a put of ``key`` in KV bucket ``bucket`` is published to."""
    return f"$KV.{bucket}.{key}"


class PublishDenials:
    """The subjects the server refused this connection to publish to.

    A denied publish is dropped by the server, which says so only in an asynchronous
    ``-ERR``; the publisher's request then merely times out. Whoever must tell "denied"
    (permanent) from "NATS is slow" (transient) asks here after a timeout.
    """

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def note(self, message: str) -> bool:
        """Remember the subject of a permissions violation; False when ``message`` is not one."""
        match = _PUBLISH_DENIED.search(message)
        if match is None:
            return False
        # nats-py lowercases the server's message, subject included.
        self._at[match.group(1).lower()] = time.monotonic()
        return True

    def denied_since(self, subjects: Iterable[str], since: float) -> str | None:
        """The first of ``subjects`` refused at or after ``since`` (``time.monotonic()``)."""
        for subject in subjects:
            at = self._at.get(subject.lower())
            if at is not None and at >= since:
                return subject
        return None


@dataclass(frozen=True)
class BusOptions:
    """How to reach NATS. Several URLs name several servers of one cluster."""

    urls: tuple[str, ...]
    name: str = "vmfleet"
    #: A JWT/nkey credentials file (``nsc generate creds``); needs the ``nkeys`` package.
    credentials_file: str | None = None
    #: The CA certificate (PEM) the servers' certificates are verified with; without it the
    #: system's trusted CAs are used when the server requires TLS.
    tls_ca_file: str | None = None
    #: A client certificate and its key (PEM), for servers that verify clients.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    #: Replies to this connection's requests arrive below this prefix; a NATS user may be
    #: allowed to subscribe only there (natsbus.inbox_prefix).
    inbox_prefix: str = DEFAULT_INBOX_PREFIX
    connect_timeout_s: float = 5.0
    #: How long the *first* connection may take before start-up fails with a clear error.
    first_connect_timeout_s: float = 30.0
    on_reconnect: Callable[[], None] | None = field(default=None, compare=False)
    #: Where the connection notes the subjects the server refused it to publish to.
    denials: PublishDenials | None = field(default=None, compare=False)

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)


def tls_context(options: BusOptions) -> ssl.SSLContext | None:
    """The client's TLS context, or None when no TLS setting is given."""
    if not options.uses_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.tls_ca_file)
    if options.tls_cert_file:
        context.load_cert_chain(options.tls_cert_file, options.tls_key_file)
    return context


async def connect(options: BusOptions) -> Client:
    """Connect, retrying forever on later disconnects (a worker must outlive a NATS restart).

    The first connection attempt also retries, for a bounded time, so that a component
    started beside its NATS server does not lose the race against it; a refusal ends it.
    """

    async def reconnected() -> None:
        log.warning("reconnected to NATS")
        if options.on_reconnect is not None:
            options.on_reconnect()

    async def disconnected() -> None:
        if not nc.is_closed:  # nats-py calls this on close too: that is no disconnect
            log.warning("disconnected from NATS; reconnecting")

    kwargs: dict[str, object] = {
        "connect_timeout": options.connect_timeout_s,
        "reconnect_time_wait": 0.5,
    }
    if options.credentials_file:
        kwargs["user_credentials"] = options.credentials_file
    if options.user is not None:
        kwargs["user"] = options.user
        kwargs["password"] = options.password or ""
    if options.token is not None:
        kwargs["token"] = options.token
    context = tls_context(options)
    if context is not None:
        kwargs["tls"] = context
    with anyio.fail_after(options.first_connect_timeout_s):
        while True:
            nc = _Client()
            try:
                await _connect(nc, options, reconnected, disconnected, kwargs)
            except (OSError, NoServersError) as exc:
                await _close_quietly(nc)
                log.info("NATS not reachable yet (%s); retrying", exc)
                await anyio.sleep(0.5)
                continue
            except BaseException:  # refused, timed out, cancelled: no half-open client left
                await _close_quietly(nc)
                raise
            if context is not None and not _server_requires_tls(nc):
                await _close_quietly(nc)
                raise BusRefused(
                    f"NATS at {', '.join(options.urls)} does not require TLS, but NATS_TLS_CA / "
                    "NATS_TLS_CERT is set: refusing to talk to it in plain text (give the "
                    "server a tls block, or unset the TLS settings)"
                )
            return nc


async def _connect(
    nc: Client,
    options: BusOptions,
    reconnected: Callable[[], Awaitable[None]],
    disconnected: Callable[[], Awaitable[None]],
    kwargs: dict[str, object],
) -> None:
    connecting = True
    refused: list[BusRefused] = []

    async def error(exc: Exception) -> None:
        refusal = _refusal(exc, options)
        if connecting and refusal is not None:
            # The client's connect loop would retry forever (and, after a failed TLS
            # handshake, can hang closing the socket): stop it from here.
            if not refused:
                refused.append(BusRefused(refusal))
                refused[0].__cause__ = exc
            scope.cancel()
        elif refusal is not None or "permissions violation" in str(exc).lower():
            if options.denials is not None:
                options.denials.note(str(exc))
            # A request the server does not permit only times out; say why here.
            log.error("NATS refuses this component (%s): %s", options.name, refusal or exc)
        else:
            log.debug("NATS client error: %s", exc)

    with anyio.CancelScope() as scope:
        await nc.connect(
            servers=list(options.urls),
            name=options.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnected_cb=reconnected,
            disconnected_cb=disconnected,
            error_cb=error,
            inbox_prefix=options.inbox_prefix,
            **kwargs,  # type: ignore[arg-type]
        )
    connecting = False
    if refused:
        raise refused[0]


def _refusal(exc: Exception, options: BusOptions) -> str | None:
    """What to tell the operator when ``exc`` means the server refuses this connection."""
    where = f"NATS at {', '.join(options.urls)}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = (
            "check that NATS_TLS_CA is the CA certificate that signed the server's"
            if options.tls_ca_file
            else "set NATS_TLS_CA to the CA certificate that signed the server's"
        )
        return f"{where}: TLS certificate not trusted ({exc.verify_message}); {hint}"
    if isinstance(exc, ssl.SSLError):
        return (
            f"{where}: TLS handshake failed ({exc.reason or exc}); check NATS_TLS_CERT and "
            "NATS_TLS_KEY (the server may require a client certificate)"
        )
    if isinstance(exc, NatsError) and any(text in str(exc).lower() for text in _AUTH_REFUSALS):
        return (
            f"{where} refused the credentials ({str(exc).removeprefix('nats: ').strip()}); "
            "check NATS_USER and NATS_PASSWORD, NATS_TOKEN or NATS_CREDS"
        )
    return None


class _Client(Client):
    """nats-py's client, safe against a PONG for a ping nobody waits for any more.

    A flush that times out or is cancelled (a shutdown cuts it short) leaves its future,
    cancelled, in the queue of pings awaiting their PONG; nats-py then sets a result on it
    when the PONG arrives, and the InvalidStateError that raises in its read loop is logged
    with a traceback ("nats: encountered error") and the rest of that read is lost.
    """

    async def _process_pong(self) -> None:
        if self._pongs and self._pongs[0].done():
            self._pongs.pop(0)  # this PONG answers the abandoned ping: nothing to tell
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()


async def close(nc: Client, *, timeout_s: float = 5.0) -> None:
    """End a component's connection at its shutdown: flush what it published, then close.

    Not nats-py's ``drain()``: by now the component's subscribers have stopped reading, so
    draining their subscriptions waits for messages nobody takes, until nats-py's own 30 s
    timeout; cutting that short leaves its drain tasks failing in the background (asyncio's
    "_GatheringFuture exception was never retrieved"). Shielded: it runs in the ``finally``
    of a daemon being cancelled.
    """
    with anyio.CancelScope(shield=True):
        if nc.is_connected:
            try:
                await nc.flush(timeout=max(1, round(timeout_s)))
            except Exception as exc:
                log.info("NATS did not confirm the last messages before closing: %s", exc)
        await _close_quietly(nc, timeout_s)


async def _close_quietly(nc: Client, timeout_s: float = 2.0) -> None:
    with anyio.move_on_after(timeout_s, shield=True):
        try:
            await nc.close()
        except Exception as exc:  # e.g. the server went away: the socket is gone already
            log.debug("closing a NATS connection: %r", exc)


def _server_requires_tls(nc: Client) -> bool:
    # nats-py upgrades to TLS only when the server's INFO says tls_required; it offers no
    # public accessor for that INFO, and without this check a server (or someone in the
    # middle) that does not ask for TLS would get the connection in plain text.
    info = getattr(nc, "_server_info", {})
    return bool(isinstance(info, dict) and info.get("tls_required"))
