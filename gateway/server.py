"""Running the ASGI app under uvicorn inside an anyio task group.

uvicorn normally owns the process's signals; here the caller (``vmfleet gateway`` or
``vmfleet dev``) owns them and stops the server by cancelling its task, so the server is
one child among the daemon's others and shuts down in order with them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp

__all__ = ["bind", "serve"]

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so 'address in use' is an error we can report.

    The protocol is named (IPPROTO_TCP, not 0): accepted sockets inherit it, and asyncio
    only turns Nagle off on sockets whose protocol says TCP. Without that, a response
    written as headers then body waits ~40 ms for the client's delayed ACK on every
    kept-alive connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(
    app: ASGIApp,
    sock: socket.socket,
    *,
    graceful_timeout_s: int = 5,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; report started once the app's lifespan has run."""
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=graceful_timeout_s,
        # As hypeman's server: no permessage-deflate. Session output is often already
        # compressed or binary, deflate would cost the gateway CPU on every frame, and
        # flow control should count the bytes a client really holds.
        ws_per_message_deflate=False,
    )
    server = _Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_shielded, server, sock)
        try:
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("gateway failed to start (see the log above)")
                await anyio.sleep(0.02)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            server.should_exit = True


async def _serve_shielded(server: uvicorn.Server, sock: socket.socket) -> None:
    # Shielded so that cancellation becomes uvicorn's own graceful shutdown, not an abort.
    with anyio.CancelScope(shield=True):
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
