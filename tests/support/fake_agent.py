"""An in-process stand-in for the guest agent's host side (``worker.agent``), to unit-test
the session relay (worker/sessions.py, gateway/sessions.py) without booting a guest.

It speaks the agent contract's frame semantics for a few commands, lazily: a frame is made
only when ``receive()`` asks for it, like the real agent, which sends only on credit. So a
client that stops reading shows up here as frames never produced.

While the real ``worker.agent`` has not landed, a stand-in module with the contract's
names is installed under that name (tests only).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from schemas.errors import HypervisorError

try:
    import worker.agent as agent_api
    from worker.agent import AgentSessionClosed as _Check  # noqa: F401
except ImportError:  # the agent's host side is not (all) in the tree yet

    @dataclass(frozen=True)
    class _Frame:
        text: bool
        data: bytes

    class _AgentUnavailable(HypervisorError):
        pass

    class _AgentSessionClosed(Exception):
        pass

    agent_api = types.ModuleType("worker.agent")
    agent_api.Frame = _Frame  # type: ignore[attr-defined]
    agent_api.AgentUnavailable = _AgentUnavailable  # type: ignore[attr-defined]
    agent_api.AgentSessionClosed = _AgentSessionClosed  # type: ignore[attr-defined]
    agent_api.AgentSession = object  # type: ignore[attr-defined]
    agent_api.AgentHub = object  # type: ignore[attr-defined]
    sys.modules["worker.agent"] = agent_api

Frame: Any = agent_api.Frame
AgentUnavailable: Any = agent_api.AgentUnavailable
AgentSessionClosed: Any = agent_api.AgentSessionClosed

CHUNK = 64 * 1024


class FakeSession:
    def __init__(self, hub: FakeHub, kind: str) -> None:
        self.hub = hub
        self.kind = kind
        self.closed = False
        self.produced = 0  # bytes handed out by receive()
        self._inbox: list[Any] = []
        self._input = anyio.Event()
        self._eof = False
        self._frames: AsyncIterator[Any] | None = None

    async def send(self, frame: Any) -> None:
        if self.closed:
            raise AgentSessionClosed("session closed")
        self._inbox.append(frame)
        self._input.set()

    async def send_eof(self) -> None:
        self._eof = True
        self._input.set()

    async def receive(self) -> Any:
        if self.closed:
            raise AgentSessionClosed("session closed")
        if self._frames is None:
            self._frames = self._script()
        try:
            frame = await self._frames.__anext__()
        except StopAsyncIteration:
            raise anyio.EndOfStream from None
        self.produced += len(frame.data)
        return frame

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._input.set()

    async def _next_input(self) -> Any | None:
        """The next frame from the client, or None at end of input."""
        while not self._inbox:
            if self._eof or self.closed:
                return None
            self._input = anyio.Event()
            await self._input.wait()
        return self._inbox.pop(0)

    async def _script(self) -> AsyncIterator[Any]:
        first = await self._next_input()
        assert first is not None
        if self.kind == "stat":
            async for frame in self._stat(json.loads(first.data)):
                yield frame
            return
        if not first.text:
            yield Frame(text=True, data=b'{"error":"first frame must be a JSON request"}')
            return
        try:
            request = json.loads(first.data)
        except ValueError:
            yield Frame(text=True, data=b'{"error":"malformed JSON request"}')
            return
        script = self._exec if self.kind == "exec" else self._copy
        async for frame in script(request):
            yield frame

    async def _exec(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        argv = request["command"]
        self.hub.argvs.append(argv)
        if argv[0] == "echo":
            yield Frame(text=False, data=(" ".join(argv[1:]) + "\n").encode())
            yield _exit(0)
        elif argv[0] == "exit":
            yield _exit(int(argv[1]))
        elif argv[0] == "cat":
            while (frame := await self._next_input()) is not None:
                yield Frame(text=False, data=frame.data)
            yield _exit(0)
        elif argv[0] == "yes":  # floods incompressible output until aborted
            block = os.urandom(CHUNK)
            while True:
                yield Frame(text=False, data=block)
        elif argv[0] == "sleep":
            await anyio.sleep_forever()
        elif argv[0] == "vanish":  # the agent dies mid-session
            yield Frame(text=False, data=b"partial\n")
            raise AgentSessionClosed("the guest agent is gone")
        else:
            yield Frame(text=False, data=f"Error: {argv[0]}: not found\r\n".encode())
            yield _exit(127)

    async def _copy(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        if request["direction"] == "to":
            written = 0
            while (frame := await self._next_input()) is not None:
                if frame.text and json.loads(frame.data).get("type") == "end":
                    break
                written += len(frame.data)
            self.hub.uploads[request["guest_path"]] = written
            result: dict[str, Any] = {"type": "result", "success": True}
            if written:
                result["bytes_written"] = written
            yield Frame(text=True, data=json.dumps(result).encode())
            return
        path = request["guest_path"]
        size = self.hub.files.get(path)
        if size is None:
            message = {"type": "error", "message": "no such file", "path": path}
            yield Frame(text=True, data=json.dumps(message).encode())
            return
        name = path.rsplit("/", 1)[-1]
        header = {"type": "header", "path": name, "mode": 420, "is_dir": False, "size": size}
        yield Frame(text=True, data=json.dumps({**header, "mtime": 0}).encode())
        for start in range(0, size, CHUNK):
            yield Frame(text=False, data=b"x" * min(CHUNK, size - start))
        yield Frame(text=True, data=b'{"type":"end","final":true}')

    async def _stat(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        size = self.hub.files.get(request["path"])
        info = {"exists": size is not None, "is_file": size is not None, "size": size or 0}
        yield Frame(text=True, data=json.dumps(info).encode())


def _exit(code: int) -> Any:
    return Frame(text=True, data=json.dumps({"exitCode": code}).encode())


@dataclass
class FakeHub:
    """``AgentHub.open_session`` over fake sessions; ``ready`` says which instances have
    an agent."""

    ready: set[str] = field(default_factory=set)
    sessions: list[FakeSession] = field(default_factory=list)
    argvs: list[list[str]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    uploads: dict[str, int] = field(default_factory=dict)

    async def open_session(self, instance_id: str, kind: str, *, wait_s: float = 0.0) -> Any:
        if instance_id not in self.ready:
            raise AgentUnavailable(f"the guest agent of {instance_id} is not available")
        session = FakeSession(self, kind)
        self.sessions.append(session)
        return session

    def open_count(self) -> int:
        return sum(not session.closed for session in self.sessions)
