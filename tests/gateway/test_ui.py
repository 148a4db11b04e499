"""The browser view at ``/ui``, rendered by a real headless Chromium against a real gateway.

The fleet is records only (a fake host that heartbeats, instance records put in the bucket
as a worker writes them, events and log lines published to their streams), so no VM
boots. Chromium is Debian's package, which ``scripts/install.sh`` installs.

Chromium is driven two ways. Its command line (``--dump-dom``, ``--screenshot``) shows
what the page renders once loaded. What changes while the page is open needs the DevTools
protocol, here over a pipe (``--remote-debugging-pipe``, no extra library): a virtual time
budget runs ahead of the wall clock (5 virtual seconds pass in about one real one) and is
spent before the test could publish anything.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
import nats
import pytest

from cli.settings import ConfigError, load_settings
from gateway import GatewayConfig, create_app
from natsbus import BusOptions
from schemas.api import InstanceState
from schemas.codec import encode
from schemas.messages import (
    HealthCheckSpec,
    HealthState,
    LogLine,
    RestartPolicySpec,
    RestartState,
    StateEvent,
)
from tests.support.gateway import (
    Bus,
    FakeHost,
    GatewayHandle,
    instance_record,
    mint,
    running_gateway,
)

pytestmark = pytest.mark.anyio

#: Required on this machine: no sandbox (root, containers), no GPU, no network chatter.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
HOST = "ui-host-1"
#: (id, name, state) of the instances the fleet starts with.
INSTANCES = (
    ("i-web-0001", "web", InstanceState.RUNNING),
    ("i-db-0002", "db", InstanceState.STANDBY),
    ("i-job-0003", "batch-job", InstanceState.STOPPED),
)


def supervised() -> dict[str, dict[str, object]]:
    """What supervision says of some of them, as the worker records it (the rest have
    nothing). Made when a test runs: an expiry minted at import would be minutes closer by
    the time a long suite reaches the test."""
    return {
        "i-web-0001": {
            "health_check": HealthCheckSpec(type="tcp", port=80),
            "health": HealthState(status="unhealthy", last_error="connection refused"),
            "restart_policy": RestartPolicySpec(policy="on_failure", max_attempts=2),
            "restart": RestartState(attempts=2, blocked_reason="max_attempts_exceeded"),
            "expires_at": datetime.now(UTC) + timedelta(hours=2, minutes=5),
        },
        "i-job-0003": {"exit_code": 3, "exit_message": "exited with code 3"},
    }


# -- the setting -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1", "true", "Yes", " on "])
def test_vmfleet_ui_turns_the_view_on(raw: str) -> None:
    assert load_settings({"VMFLEET_UI": raw}).ui is True


@pytest.mark.parametrize("raw", ["", "0", "false", "NO", "off"])
def test_vmfleet_ui_is_off_unless_set(raw: str) -> None:
    assert load_settings({"VMFLEET_UI": raw}).ui is False
    assert load_settings({}).ui is False


def test_a_bad_vmfleet_ui_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^VMFLEET_UI: 'maybe' must be 1 or 0"):
        load_settings({"VMFLEET_UI": "maybe"})


# -- the route, without a browser ------------------------------------------------------------


def _asgi_client(*, ui: bool) -> httpx.AsyncClient:
    # No lifespan: none of these requests gets past the UI or the bearer check to NATS.
    config = GatewayConfig(bus=BusOptions(urls=("nats://127.0.0.1:1",)), jwt_secret="s" * 32, ui=ui)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(config)), base_url="http://gw"
    )


@pytest.mark.parametrize("path", ["/ui", "/ui/", "/ui/app.js", "/ui/anything"])
@pytest.mark.parametrize("with_token", [False, True])
async def test_ui_is_off_by_default_and_then_a_json_404(path: str, with_token: bool) -> None:
    headers = {"Authorization": f"Bearer {mint('s' * 32)}"} if with_token else {}
    async with _asgi_client(ui=False) as client:
        response = await client.get(path, headers=headers)
    assert response.status_code == 404
    assert response.json() == {
        "code": "not_found",
        "message": "the browser view is turned off (VMFLEET_UI=1 turns it on)",
    }
    assert response.headers["x-should-retry"] == "false"


async def test_ui_page_is_public_static_and_locked_down() -> None:
    async with _asgi_client(ui=True) as client:
        page = await client.get("/ui")
        script = await client.get("/ui/app.js")
        style = await client.get("/ui/app.css")
        unknown = await client.get("/ui/secrets.json")
        posted = await client.post("/ui")
        api = [await client.get(path) for path in ("/events", "/instances", "/hosts")]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'"):
        assert directive in csp
    assert "frame-ancestors 'none'" in csp and "form-action 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # CSP forbids inline script: every script is a file of the gateway's.
    assert page.text.count("<script") == page.text.count('<script src="/ui/')
    assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    assert posted.status_code == 405 and posted.json()["code"] == "method_not_allowed"
    # The API itself is exactly as guarded as without the view.
    for response in api:
        assert response.status_code == 401
        assert response.json()["code"] == "Unauthorized"


# -- a fleet of records, and a gateway that serves the view ------------------------------------


@pytest.fixture
def ui_gw(nats_url: str, subject_prefix: str) -> Iterator[GatewayHandle]:
    with running_gateway(nats_url, subject_prefix, ui=True) as handle:
        yield handle


@pytest.fixture
async def ui_bus(nats_url: str, subject_prefix: str, ui_gw: GatewayHandle) -> AsyncIterator[Bus]:
    nc = await nats.connect(nats_url)
    try:
        yield Bus(nc, subject_prefix)
    finally:
        await nc.close()


async def _put_instances(bus: Bus, api: GatewayHandle) -> None:
    for instance_id, name, state in INSTANCES:
        record = instance_record(
            instance_id, name, HOST, state=state, **supervised().get(instance_id, {})
        )
        await bus.put(bus.subjects.instances_bucket, instance_id, record)
    async with api.async_client() as client:
        with anyio.fail_after(10):
            while True:
                hosts = (await client.get("/hosts")).json()
                listed = (await client.get("/instances")).json()
                if [h["id"] for h in hosts] == [HOST] and len(listed) == len(INSTANCES):
                    return
                await anyio.sleep(0.05)


def _ui_url(api: GatewayHandle) -> str:
    return f"{api.base_url}/ui#token={api.token}"


def _chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium is missing: scripts/install.sh installs Debian's package"
    return path


@contextlib.contextmanager
def _process_group(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in a session of its own; its whole group (renderers, zygotes) is
    killed on the way out."""
    process = subprocess.Popen(argv, start_new_session=True, **popen)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _run_chromium(profile: Path, *args: str) -> bytes:
    argv = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    log = profile.parent / "chromium.log"
    with (
        log.open("wb") as stderr,
        _process_group(argv, stdout=subprocess.PIPE, stderr=stderr) as process,
    ):
        out, _ = process.communicate(timeout=90)
    assert process.returncode == 0, log.read_text(errors="replace")[-2000:]
    return out


async def test_the_page_renders_the_fleet_from_the_api(
    ui_gw: GatewayHandle, ui_bus: Bus, subject_prefix: str, tmp_path: Path
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(FakeHost(ui_bus.nc, subject_prefix, HOST).run)
        await _put_instances(ui_bus, ui_gw)
        budget = "--virtual-time-budget=5000"
        dom = await anyio.to_thread.run_sync(
            _run_chromium, tmp_path / "dom", budget, "--dump-dom", _ui_url(ui_gw)
        )
        png = tmp_path / "fleet.png"
        await anyio.to_thread.run_sync(
            _run_chromium,
            tmp_path / "shot",
            budget,
            "--window-size=1200,800",
            "--hide-scrollbars",
            f"--screenshot={png}",
            _ui_url(ui_gw),
        )
        tg.cancel_scope.cancel()

    html = dom.decode()
    assert '<section id="login" hidden="">' in html, "the page asked for a token"
    assert '<span id="status" class="status" role="status">live</span>' in html
    assert f'<tr data-host-id="{HOST}">' in html
    for instance_id, name, state in INSTANCES:
        assert f'data-instance-id="{instance_id}" data-state="{state.value}"' in html
        assert f"<td>{name}</td>" in html
    assert html.count('class="state state-') == len(INSTANCES)
    assert "docker.io/library/busybox:latest" in html
    # Supervision: health (its last error on hover), restarts, expiry and an exit code.
    assert '<td class="health health-unhealthy" title="connection refused">unhealthy</td>' in html
    assert '<td class="restarts">2 (blocked: max_attempts_exceeded)</td>' in html
    assert '<td class="num expires" title="' in html and ">in 2h</td>" in html
    assert '<td class="num exit" title="exited with code 3">3</td>' in html
    # An instance without a check shows no health rather than "disabled".
    assert "disabled" not in html and html.count('<td class="health">') == 2

    data = png.read_bytes()
    assert len(data) > 8_000, f"a {len(data)}-byte screenshot is as good as blank"
    assert _png_colours(data) > 16, "the screenshot is (nearly) one colour"


# -- live: the DevTools protocol over a pipe ---------------------------------------------------


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (NUL-separated JSON
    messages on its fds 3 and 4: the transport Puppeteer and Playwright use)."""

    def __init__(self, process: subprocess.Popen[bytes], to_browser: int, from_browser: int):
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.session = ""
        self._to_browser = to_browser
        self._from_browser = from_browser
        self._next_id = 0
        self._buffer = b""

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 30
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        payload = json.dumps(message).encode() + b"\0"
        while payload:
            payload = payload[os.write(self._to_browser, payload) :]
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == message["id"]:
                assert "error" not in reply, f"{method}: {reply['error']}"
                result: dict[str, Any] = reply["result"]
                return result
            if "method" in reply:
                self.events.append(reply)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "chromium did not answer in time"
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.call("Network.enable")
        self.call("Runtime.enable")
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"never true: {expression}\n--- page ---\n{text}")
            time.sleep(0.1)

    def exceptions(self) -> list[str]:
        """What the page's scripts threw and nobody caught, so far."""
        self.evaluate("0")
        thrown = [e for e in self.events if e["method"] == "Runtime.exceptionThrown"]
        return [str(e["params"]["exceptionDetails"]) for e in thrown]

    def requests(self) -> list[dict[str, Any]]:
        """Every request the page sent so far (``url``, ``headers``)."""
        self.evaluate("0")  # collects the events that arrived meanwhile
        return [
            e["params"]["request"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", timeout_s=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@contextlib.contextmanager
def _browser(profile: Path) -> Iterator[Browser]:
    child_in, to_browser = os.pipe()
    from_browser, child_out = os.pipe()
    # Moved above 9 first, so that moving them to 3 and 4 cannot clobber one with the other.
    high_in = fcntl.fcntl(child_in, fcntl.F_DUPFD, 10)
    high_out = fcntl.fcntl(child_out, fcntl.F_DUPFD, 10)
    os.close(child_in)
    os.close(child_out)
    open_fds = [to_browser, from_browser, high_in, high_out]
    argv = [
        "/bin/bash",
        "-c",
        f'exec "$@" 3<&{high_in} 4>&{high_out} {high_in}<&- {high_out}>&-',
        "chromium",
        _chromium(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
        "--window-size=1200,900",
        "about:blank",
    ]
    log = profile.parent / "chromium.log"
    try:
        with (
            log.open("wb") as out,
            _process_group(
                argv, pass_fds=(high_in, high_out), stdin=subprocess.DEVNULL, stdout=out, stderr=out
            ) as process,
        ):
            for fd in (high_in, high_out):  # the browser holds them now
                os.close(fd)
                open_fds.remove(fd)
            browser = Browser(process, to_browser, from_browser)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        for fd in open_fds:
            os.close(fd)


def _row_state(instance_id: str) -> str:
    return f"document.querySelector('tr[data-instance-id=\"{instance_id}\"]')?.dataset.state"


async def _subscribers(bus: Bus, stream: str) -> int:
    return (await bus.js.stream_info(stream)).state.consumer_count


async def _wait_for_subscriber(bus: Bus, stream: str) -> None:
    """Until the page's stream has its ordered consumer (only the page reads ``stream``),
    so that what is published next reaches it."""
    with anyio.fail_after(20):
        while await _subscribers(bus, stream) < 1:
            await anyio.sleep(0.05)


async def test_events_and_logs_reach_the_open_page(
    ui_gw: GatewayHandle, ui_bus: Bus, subject_prefix: str, tmp_path: Path
) -> None:
    web = INSTANCES[0][0]
    subjects = ui_bus.subjects

    async def event(instance_id: str, name: str, previous: str, state: str, **more: Any) -> None:
        await ui_bus.js.publish(
            subjects.state(HOST, instance_id),
            encode(
                StateEvent(
                    instance_id=instance_id,
                    name=name,
                    host=HOST,
                    previous=InstanceState(previous),
                    state=InstanceState(state),
                    at=datetime.now(UTC),
                    **more,
                )
            ),
        )

    async def log(seq: int, line: str) -> None:
        message = LogLine(instance_id=web, source="app", seq=seq, line=line, at=datetime.now(UTC))
        await ui_bus.js.publish(subjects.logs(web, "app"), encode(message))

    async with anyio.create_task_group() as tg:
        await tg.start(FakeHost(ui_bus.nc, subject_prefix, HOST).run)
        await _put_instances(ui_bus, ui_gw)
        await log(1, "booted")
        await log(2, "<b>not markup</b>")
        with _browser(tmp_path / "profile") as browser:
            run = anyio.to_thread.run_sync
            await run(browser.open, _ui_url(ui_gw))
            await run(browser.wait_for, "document.getElementById('status')?.textContent === 'live'")
            assert await run(browser.evaluate, _row_state(web)) == "Running"
            # The token left the address bar; it stays in this tab's storage only.
            assert await run(browser.evaluate, "location.hash") == ""
            assert ui_gw.token not in await run(browser.evaluate, "location.href")

            # A transition published while the page is open. Only the event changes (the
            # record still says Running), so the table can only have it from /events.
            await _wait_for_subscriber(ui_bus, subjects.states_stream)
            await event(web, "web", "Running", "Paused")
            await run(browser.wait_for, f"{_row_state(web)} === 'Paused'")

            # A new instance: its row comes from the event, its image from its record.
            fresh = instance_record("i-new-0004", "fresh", HOST, image="docker.io/library/nginx:1")
            await ui_bus.put(subjects.instances_bucket, fresh.id, fresh)
            await event(fresh.id, "fresh", "Stopped", "Created")
            await run(browser.wait_for, f"{_row_state(fresh.id)} === 'Created'")
            await run(
                browser.wait_for,
                "document.getElementById('instances').innerText.includes('nginx:1')",
            )
            # A deletion removes the row.
            gone = INSTANCES[2][0]
            await event(gone, "batch-job", "Stopped", "Stopped", deleted=True)
            await run(browser.wait_for, f"{_row_state(gone)} === undefined")

            # A click opens the instance's log stream: the backlog, then live lines.
            await run(
                browser.evaluate,
                f"document.querySelector('tr[data-instance-id=\"{web}\"]').click()",
            )
            lines = "document.getElementById('logs-lines')"
            await run(browser.wait_for, f"{lines}.textContent.includes('booted')")
            await log(3, "a line written while the page follows")
            await run(browser.wait_for, f"{lines}.textContent.includes('while the page follows')")
            # Log text is text: markup in a line is shown, never parsed.
            assert "<b>not markup</b>" in await run(browser.evaluate, f"{lines}.textContent")
            assert await run(browser.evaluate, f"{lines}.querySelector('b')") is None

            shot = await run(browser.call, "Page.captureScreenshot", {"format": "png"})
            requests = await run(browser.requests)

            # Without a token the page asks for one; a refused one is explained.
            await run(browser.evaluate, "document.getElementById('logout').click()")
            await run(browser.wait_for, "!document.getElementById('login').hidden")
            assert await run(browser.evaluate, "sessionStorage.length") == 0
            submit = (
                "document.getElementById('token').value = {};"
                "document.getElementById('login-form').requestSubmit()"
            )
            await run(browser.evaluate, submit.format('"not-a-token"'))
            await run(
                browser.wait_for,
                "document.getElementById('login-error').textContent.includes('invalid token')",
            )
            await run(browser.evaluate, submit.format(json.dumps(ui_gw.token)))
            await run(browser.wait_for, "document.getElementById('status').textContent === 'live'")
            # The record still says Running: the table is a fresh snapshot again.
            assert await run(browser.evaluate, _row_state(web)) == "Running"
            assert await run(browser.exceptions) == []
        tg.cancel_scope.cancel()

    live = tmp_path / "live.png"  # kept with the test's files, to look at when it fails
    live.write_bytes(base64.b64decode(shot["data"]))
    assert _png_colours(live.read_bytes()) > 16
    # The token never travels in a URL; every API call carries it in the header.
    assert requests and all(ui_gw.token not in r["url"] for r in requests)
    api_calls = [
        r
        for r in requests
        if r["url"].startswith(ui_gw.base_url) and not urlsplit(r["url"]).path.startswith("/ui")
    ]
    called = {urlsplit(r["url"]).path for r in api_calls}
    assert {"/events", "/hosts", "/instances", f"/instances/{web}/logs"} <= called
    for request in api_calls:
        assert request["headers"].get("Authorization") == f"Bearer {ui_gw.token}", request["url"]


# -- helpers -----------------------------------------------------------------------------------


def _png_colours(data: bytes, enough: int = 64) -> int:
    """How many distinct pixel values a PNG holds (counting stops at ``enough``), decoded
    with the standard library: chunks, zlib, then the five row filters undone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    previous = bytes(stride)
    colours: set[bytes] = set()
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, bpp)
        colours.update(bytes(row[x : x + bpp]) for x in range(0, stride, bpp * 7))
        if len(colours) >= enough:
            break
        previous = bytes(row)
    return len(colours)


def _unfilter(kind: int, row: bytearray, above: bytes, bpp: int) -> bytearray:
    if kind == 0:
        return row
    if kind == 2:
        return bytearray((r + a) & 0xFF for r, a in zip(row, above, strict=True))
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        up = above[i]
        corner = above[i - bpp] if i >= bpp else 0
        if kind == 1:
            predictor = left
        elif kind == 3:
            predictor = (left + up) // 2
        else:
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
        row[i] = (row[i] + predictor) & 0xFF
    return row
