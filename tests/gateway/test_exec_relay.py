"""The session relay (gateway ↔ NATS ↔ worker) against an in-process fake agent: a unit
test of the transport, driven through hypeman's SDK and a raw WebSocket client. The same
behaviour against real guests is in test_vm_exec.py."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import websockets
from hypeman import AsyncHypeman
from hypeman.lib import (
    CopyProtocolError,
    cp_from_instance_async,
    cp_to_instance_async,
    exec_async,
)
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import TokenScope
from schemas.api import InstanceState
from schemas.errors import NotFound
from schemas.sessions import SessionOpen, decode_session_opened, encode_session
from tests.support.fake_agent import FakeHub
from tests.support.gateway import SECRET, Bus, GatewayHandle, host_record, instance_record

pytestmark = pytest.mark.anyio

A = "a" + "1" * 23  # Running, with an agent
B = "b" + "2" * 23  # Stopped
C = "c" + "3" * 23  # Running, its agent not answering
SILENT = "silent-host"


@dataclass
class FakeInstances:
    """The worker's view of its instances (worker.sessions.SessionHost)."""

    states: dict[str, InstanceState]
    audits: list[str] = field(default_factory=list)

    def state(self, instance_id: str) -> InstanceState:
        if instance_id not in self.states:
            raise NotFound(f"instance {instance_id} not found")
        return self.states[instance_id]

    def audit(self, instance_id: str, message: str, **fields: object) -> None:
        extras = " ".join(f"{k}={v}" for k, v in fields.items())
        self.audits.append(f"{instance_id} {message} {extras}")


@dataclass
class Relay:
    gw: GatewayHandle
    bus: Bus
    hub: FakeHub
    instances: FakeInstances

    clients: list[AsyncHypeman] = field(default_factory=list)

    def client(self, token: str | None = None) -> AsyncHypeman:
        """An SDK client, closed by the fixture in this test's event loop."""
        client = AsyncHypeman(
            api_key=token or self.gw.token, base_url=self.gw.base_url, max_retries=0
        )
        self.clients.append(client)
        return client

    def url(self, instance: str, endpoint: str) -> str:
        return self.gw.base_url.replace("http://", "ws://") + f"/instances/{instance}/{endpoint}"

    def connect(self, instance: str, endpoint: str = "exec") -> connect:
        return connect(
            self.url(instance, endpoint), additional_headers=self.gw.headers, max_size=2**20
        )


@pytest.fixture
async def relay(gw: GatewayHandle, bus: Bus) -> AsyncIterator[Relay]:
    from worker.metrics import WorkerMetrics
    from worker.sessions import SessionServer

    hub = FakeHub(ready={A}, files={"/data/blob": 3 * 1024 * 1024 + 17})
    running, stopped = InstanceState.RUNNING, InstanceState.STOPPED
    instances = FakeInstances({A: running, B: stopped, C: running})
    for instance_id, state in instances.states.items():
        record = instance_record(instance_id, "i" + instance_id[:6], "h1", state=state)
        await bus.put(bus.subjects.instances_bucket, instance_id, record)
    record = instance_record("d" + "4" * 23, "silent", SILENT)
    await bus.put(bus.subjects.instances_bucket, record.id, record)
    server = SessionServer(
        bus.nc, bus.subjects, "h1", instances, hub, WorkerMetrics(CollectorRegistry())
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(_heartbeats, bus, ("h1", SILENT))
        await tg.start(server.run)
        async with gw.async_client() as http:
            with anyio.fail_after(20):
                while (await http.get(f"/instances/{A}")).json().get("state") != "Running":
                    await anyio.sleep(0.05)
        baseline = _subscriptions(bus)
        relay = Relay(gw, bus, hub, instances)
        yield relay
        for client in relay.clients:
            await client.close()
        # Every session a test opened has ended: the worker's side subscribes to nothing
        # more than before (the session subjects are gone), and no agent session is open.
        await _until(lambda: _subscriptions(bus) <= baseline and hub.open_count() == 0)
        tg.cancel_scope.cancel()


def _subscriptions(bus: Bus) -> int:
    """Subscriptions on the worker side's connection (nats-py keeps no public count)."""
    return len(bus.nc._subs)  # type: ignore[attr-defined]


async def _heartbeats(bus: Bus, hosts: tuple[str, ...]) -> None:
    while True:
        for host in hosts:
            await bus.put(bus.subjects.hosts_bucket, host, host_record(host))
        await anyio.sleep(1)


async def _until(check: object, timeout_s: float = 30) -> None:
    with anyio.fail_after(timeout_s):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.05)


def _token(scopes: list[TokenScope] | None) -> str:
    from cli.token import mint_token

    return mint_token(SECRET, subject="scoped", scopes=scopes)


# -- exec ------------------------------------------------------------------------------------


async def test_exec_output_exit_code_and_audit(relay: Relay) -> None:
    client = relay.client()
    result = await exec_async(client, A, ["echo", "hello", "fleet"])
    assert (result.output, result.exit_code) == (b"hello fleet\n", 0)
    assert (await exec_async(client, A, ["exit", "3"])).exit_code == 3
    assert (await exec_async(client, "ia11111", ["exit", "0"])).exit_code == 0  # by name
    assert any(
        line.startswith(f"{A} exec ")
        and 'subject="test"' in line
        and '["echo","hello","fleet"]' in line
        for line in relay.instances.audits
    )
    await _until(lambda: relay.hub.open_count() == 0)


async def test_concurrent_sessions_on_one_instance(relay: Relay) -> None:
    client = relay.client()
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = (await exec_async(client, A, ["echo", str(i)])).output

    async with anyio.create_task_group() as tg:
        for i in range(25):
            tg.start_soon(one, i)
    assert results == {i: f"{i}\n".encode() for i in range(25)}


async def test_stdin_larger_than_a_nats_message_arrives_whole(relay: Relay) -> None:
    data = secrets.token_bytes(3 * 1024 * 1024 + 5)  # one WebSocket frame, split on NATS
    async with relay.connect(A) as ws:
        await ws.send(json.dumps({"command": ["cat"], "tty": False}))
        await ws.send(data)
        await ws.send('{"eof":true}')
        output, final = await _drain(ws)
    assert (output, final) == (data, {"exitCode": 0})


async def _drain(ws: ClientConnection) -> tuple[bytes, object]:
    output = bytearray()
    async for frame in ws:
        if isinstance(frame, bytes):
            assert len(frame) <= 32 * 1024
            output += frame
        else:
            return bytes(output), json.loads(frame)
    raise AssertionError("closed without a final frame")


async def test_agent_not_available_is_exit_127_with_the_reason(relay: Relay) -> None:
    result = await exec_async(relay.client(), C, ["echo"])
    assert result.exit_code == 127
    assert result.output.startswith(b"Error: ") and b"not available" in result.output


async def test_agent_lost_mid_session(relay: Relay) -> None:
    result = await exec_async(relay.client(), A, ["vanish"])
    assert result.exit_code == 127
    assert result.output.startswith(b"partial\n") and b"the guest agent is gone" in result.output
    await _until(lambda: relay.hub.open_count() == 0)


async def test_first_frame_binary_or_malformed_is_the_agents_error(relay: Relay) -> None:
    for first in (b"\x00binary", "{not json"):
        async with relay.connect(A) as ws:
            await ws.send(first)
            answer = json.loads(await ws.recv())
        assert set(answer) == {"error"}


async def test_text_frame_over_the_limit_ends_the_session(relay: Relay) -> None:
    async with relay.connect(A) as ws:
        await ws.send(json.dumps({"command": ["cat"], "tty": False}))
        await ws.send(json.dumps({"resize": "x" * (600 * 1024)}))
        output, final = await _drain(ws)
    assert final == {"exitCode": 127} and b"larger than 512 KiB" in output
    await _until(lambda: relay.hub.open_count() == 0)


# -- refusals before the upgrade -----------------------------------------------------------


async def _refusal(
    relay: Relay, instance: str, token: str | None, endpoint: str = "exec"
) -> tuple[int, object]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(relay.url(instance, endpoint), additional_headers=headers):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"null")


async def test_refused_before_the_upgrade(relay: Relay) -> None:
    assert await _refusal(relay, B, relay.gw.token) == (
        409,
        {"code": "invalid_state", "message": "instance must be running (current state: Stopped)"},
    )
    assert await _refusal(relay, "nosuch", relay.gw.token, "cp") == (
        404,
        {"code": "not_found", "message": "resource not found"},
    )
    status, body = await _refusal(relay, A, None)
    assert status == 401 and body["code"] == "Unauthorized"  # type: ignore[index]
    status, body = await _refusal(relay, A, _token(["read", "write"]), "cp")
    assert (status, body) == (
        403,
        {"code": "forbidden", "message": "this token lacks the 'exec' scope"},
    )
    assert relay.hub.sessions == []


async def test_scopes(relay: Relay) -> None:
    reader = relay.client(_token(["read"]))
    info = await reader.instances.stat(A, path="/data/blob")
    assert info.exists and info.is_file and info.size == 3 * 1024 * 1024 + 17
    async with relay.gw.async_client() as http:
        http.headers["Authorization"] = f"Bearer {_token(['read'])}"
        assert (await http.post(f"/instances/{A}/stop")).status_code == 403
        http.headers["Authorization"] = f"Bearer {_token(['exec'])}"
        assert (await http.get("/instances")).status_code == 403
    result = await exec_async(relay.client(_token(["exec"])), A, ["echo", "ok"])
    assert result.output == b"ok\n"


# -- stat ------------------------------------------------------------------------------------


async def test_stat(relay: Relay) -> None:
    client = relay.client()
    missing = await client.instances.stat(A, path="/nope", follow_links=True)
    assert missing.exists is False
    async with relay.gw.async_client() as http:
        stopped = await http.get(f"/instances/{B}/stat", params={"path": "/"})
        assert stopped.status_code == 409 and stopped.json()["code"] == "invalid_state"
        no_path = await http.get(f"/instances/{A}/stat")
        assert no_path.status_code == 400
        no_agent = await http.get(f"/instances/{C}/stat", params={"path": "/"})
        assert no_agent.status_code == 500
        assert no_agent.json() == {
            "code": "internal_error",
            "message": "failed to connect to guest agent",
        }


# -- cp --------------------------------------------------------------------------------------


async def test_cp_both_ways(relay: Relay, tmp_path: Path) -> None:
    client = relay.client()
    await cp_from_instance_async(client, A, "/data/blob", tmp_path / "out")
    assert (tmp_path / "out" / "blob").read_bytes() == b"x" * (3 * 1024 * 1024 + 17)
    upload = tmp_path / "up.bin"
    upload.write_bytes(secrets.token_bytes(2 * 1024 * 1024 + 3))
    await cp_to_instance_async(client, A, upload, "/data/up.bin")
    assert relay.hub.uploads["/data/up.bin"] == upload.stat().st_size
    with pytest.raises(CopyProtocolError, match="no such file"):
        await cp_from_instance_async(client, A, "/nothing/here", tmp_path / "none")


# -- flow control and liveness --------------------------------------------------------------


async def test_a_client_that_stops_reading_stops_the_guest(relay: Relay) -> None:
    async with relay.connect(A) as ws:
        await ws.send(json.dumps({"command": ["yes"], "tty": False}))
        await ws.recv()
        session = relay.hub.sessions[-1]
        # The flood stops once every buffer on the way is full: the credit window, the
        # gateway's socket, the kernel's. It never grows without bound.
        await _until(lambda: _stable(session), timeout_s=60)
        assert session.produced < 64 * 1024 * 1024
    await _until(lambda: session.closed)  # the client left: the agent session is aborted


_last: dict[int, tuple[int, float]] = {}


def _stable(session: object) -> bool:
    produced = session.produced  # type: ignore[attr-defined]
    seen, since = _last.get(id(session), (-1, time.monotonic()))
    if produced != seen:
        _last[id(session)] = (produced, time.monotonic())
        return False
    return time.monotonic() - since > 2


async def test_client_disconnect_aborts_the_command(relay: Relay) -> None:
    async with relay.connect(A) as ws:
        await ws.send(json.dumps({"command": ["sleep"], "tty": False}))
        await _until(lambda: relay.hub.sessions)
    await _until(lambda: relay.hub.open_count() == 0)


async def test_instance_stopping_ends_its_sessions(relay: Relay) -> None:
    async with relay.connect(A) as ws:
        await ws.send(json.dumps({"command": ["sleep"], "tty": False}))
        await _until(lambda: relay.hub.sessions)
        relay.instances.states[A] = InstanceState.STOPPED
        output, final = await _drain(ws)
    assert final == {"exitCode": 127}
    assert b"instance must be running (current state: Stopped)" in output
    await _until(lambda: relay.hub.open_count() == 0)


async def test_a_silent_host_ends_the_session_with_an_error(relay: Relay) -> None:
    """A worker that dies mid-session sends nothing more: the gateway's idle timeout."""
    opened = encode_session_opened_ok()
    subscription = await relay.bus.nc.subscribe(relay.bus.subjects.session_open(SILENT))

    async def answer_once() -> None:
        msg = await subscription.next_msg(timeout=30)
        await msg.respond(opened)

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer_once)
        async with relay.connect("d" + "4" * 23) as ws:
            await ws.send(json.dumps({"command": ["sleep"], "tty": False}))
            output, final = await _drain(ws)
    await subscription.unsubscribe()
    assert final == {"exitCode": 127} and b"stopped answering" in output


def encode_session_opened_ok() -> bytes:
    from schemas.sessions import SessionOpened

    return encode_session(SessionOpened(ok=True, window=1 << 20))


async def test_a_silent_gateway_ends_the_session(relay: Relay) -> None:
    """A gateway that dies mid-session: the worker's idle timeout aborts the agent side."""
    request = SessionOpen(
        session_id="s" + secrets.token_hex(8),
        instance_id=A,
        kind="exec",
        subject="test",
        window=1 << 20,
        first=json.dumps({"command": ["sleep"], "tty": False}).encode(),
        first_text=True,
    )
    reply = await relay.bus.nc.request(
        relay.bus.subjects.session_open("h1"), encode_session(request), timeout=10
    )
    assert decode_session_opened(reply.data).ok
    await _until(lambda: relay.hub.sessions and relay.hub.open_count() == 1)
    await _until(lambda: relay.hub.open_count() == 0, timeout_s=40)


async def test_closing_mid_output_is_clean(relay: Relay) -> None:
    async with relay.connect(A) as ws:
        await ws.send(json.dumps({"command": ["yes"], "tty": False}))
        await ws.recv()
        await ws.close()
        with pytest.raises(ConnectionClosed):
            for _ in range(10_000):  # what arrived before the close may still be read first
                await ws.recv()
    await _until(lambda: relay.hub.open_count() == 0)
    assert websockets  # the client library the SDK uses


# -- the CLI ---------------------------------------------------------------------------------

VMFLEET = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "vmfleet")


async def _vmfleet(relay: Relay, *args: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    env = {"HYPEMAN_BASE_URL": relay.gw.base_url, "HYPEMAN_API_KEY": relay.gw.token}
    env["PATH"] = "/usr/bin:/bin"
    done = await anyio.run_process([VMFLEET, *args], input=stdin, env=env, check=False)
    return done.returncode, done.stdout, done.stderr.decode()


async def test_cli_exec_exit_status_stdin_and_refusals(relay: Relay) -> None:
    assert await _vmfleet(relay, "exec", A, "--", "echo", "hi") == (0, b"hi\n", "")
    assert (await _vmfleet(relay, "exec", A, "--", "exit", "7"))[0] == 7
    data = secrets.token_bytes(300_000)
    status, out, _ = await _vmfleet(relay, "exec", "-i", A, "--", "cat", stdin=data)
    assert (status, out) == (0, data)
    status, _, err = await _vmfleet(relay, "exec", B, "--", "echo")
    assert status == 1
    assert err == "vmfleet: invalid_state: instance must be running (current state: Stopped)\n"
    status, _, err = await _vmfleet(relay, "exec", A)
    assert status == 1 and "no command given" in err


async def test_cli_cp_and_stat(relay: Relay, tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 17
    status, _, err = await _vmfleet(relay, "cp", f"{A}:/data/blob", str(tmp_path / "out"))
    assert status == 0, err
    assert (tmp_path / "out" / "blob").read_bytes() == b"x" * size
    status, tar_bytes, _ = await _vmfleet(relay, "cp", f"{A}:/data/blob", "-")
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        assert [(m.name, m.size) for m in tar.getmembers()] == [("blob", size)]
    local = tmp_path / "up.bin"
    local.write_bytes(b"z" * 70_000)
    assert (await _vmfleet(relay, "cp", str(local), f"{A}:/data/up.bin"))[0] == 0
    assert relay.hub.uploads["/data/up.bin"] == 70_000
    status, _, err = await _vmfleet(relay, "cp", f"{A}:/nothing", str(tmp_path))
    assert status == 1 and "no such file" in err
    status, out, _ = await _vmfleet(relay, "stat", A, "/data/blob")
    assert status == 0 and b"type:  file" in out and str(size).encode() in out
    assert (await _vmfleet(relay, "stat", A, "/nope"))[0] == 1


async def test_a_malformed_open_is_refused_and_the_host_keeps_serving(relay: Relay) -> None:
    for payload in (b"\x93garbage", _open_request("not.a.token")):
        reply = await relay.bus.nc.request(
            relay.bus.subjects.session_open("h1"), payload, timeout=10
        )
        opened = decode_session_opened(reply.data)
        assert not opened.ok and opened.error is not None
        assert opened.error.code == "bad_request"
    result = await exec_async(relay.client(), A, ["echo", "still", "here"])
    assert result.output == b"still here\n"


def _open_request(session_id: str) -> bytes:
    request = SessionOpen(
        session_id=session_id,
        instance_id=A,
        kind="exec",
        subject="test",
        window=1 << 20,
        first=b'{"command":["echo"],"tty":false}',
        first_text=True,
    )
    return encode_session(request)
