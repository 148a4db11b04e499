"""A "registry" on loopback that accepts connections and then never finishes an answer.

``silent``: reads the request and sends nothing. ``headers``: answers every request with a
status line and headers promising a body (``Content-Length``), then sends none of it. Both
hold the connection open until :meth:`StallingRegistry.stop`, the way a wedged registry or
a half-dead proxy does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

__all__ = ["StallingRegistry"]

_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
    b"Docker-Distribution-Api-Version: registry/2.0\r\n"
    b"Content-Length: 4096\r\n"
    b"\r\n"
)


class StallingRegistry:
    def __init__(self, mode: Literal["silent", "headers"] = "silent") -> None:
        self.mode = mode
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        #: How many connections it took (a client that never connected proves nothing).
        self.accepted = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._spawn(self._accept_loop)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
                self.accepted += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        pending = b""
        while not self._stopping.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            pending += data
            while self.mode == "headers" and b"\r\n\r\n" in pending:
                _, _, pending = pending.partition(b"\r\n\r\n")
                with contextlib.suppress(OSError):
                    conn.sendall(_HEADERS)
