"""Wake on connection through hypeman's SDK, on one real guest: a busybox httpd behind a
mapped port, with an auto_standby policy, put to Standby; a plain HTTP GET to the mapped
port answers 200 with the VM's page (the client never retries) and the instance is Running
again; the port then serves through QEMU alone. Then the worker is SIGKILLed while the
instance sleeps, started again, and a connection still wakes it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded_nats import free_port
from tests.gateway.conftest import Fleet
from tests.support.sdk import sdk_client, wait_for_instance

pytestmark = pytest.mark.vm

PAGE = "served-by-the-sleeping-vm"
SERVE = f"mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 8080 -h /www"


@dataclass(frozen=True)
class Web:
    client: Hypeman
    instance_id: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def web(fleet: Fleet, busybox_image: str) -> Iterator[Web]:
    client = sdk_client(fleet)
    port = free_port()
    created = client.instances.create(
        name="wake-web",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["sh", "-c", SERVE],
        # A policy whose own clock never runs out in a test: the tests send it to sleep.
        auto_standby={"enabled": True, "idle_timeout": "1h"},
        extra_body={"port_mappings": [{"guest_port": 8080, "host_port": port}]},
    )
    web = Web(client, created.id, port)
    try:
        wait_for_instance(client, created.id, lambda i: i.state == "Running")
        _wait_until_served(web.url)
        yield web
    finally:
        client.instances.delete(created.id)


def _wait_until_served(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _wait_until_bound(port: int, timeout_s: float = 120) -> None:
    """Until something (the worker) holds ``port``: binding it ourselves fails. (A connect
    would tell too, but would wake the instance.)"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing bound port {port} again")


def _asleep(web: Web) -> None:
    asleep = web.client.instances.standby(web.instance_id)
    assert asleep.state == "Standby"


def _get_once(url: str) -> httpx.Response:
    """One GET, no retry: the sleeping instance must answer this very connection."""
    with httpx.Client(transport=httpx.HTTPTransport(retries=0), timeout=120) as http:
        return http.get(url)


def _wakes(fleet: Fleet, cause: str) -> float:
    text = httpx.get(fleet.worker.metrics_url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vmfleet_worker_wakes"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("cause") == cause
    )


def test_a_get_to_a_sleeping_instance_wakes_it_and_is_answered(fleet: Fleet, web: Web) -> None:
    _asleep(web)
    before = _wakes(fleet, "connection")

    answer = _get_once(web.url)

    assert answer.status_code == 200
    assert answer.text.strip() == PAGE
    assert web.client.instances.get(web.instance_id).state == "Running"
    assert _wakes(fleet, "connection") == before + 1
    # Awake, the port serves without the worker: a later GET answers as well.
    assert _get_once(web.url).text.strip() == PAGE
    ops = "\n".join(web.client.instances.logs(web.instance_id, source="hypeman", tail=200))
    assert "wake it on the next connection" in ops
    assert "woken by connection in" in ops
    # The wake is an event with its cause, as a POST /restore is one with cause api.
    assert _wake_causes(fleet, web.instance_id, until="connection")[-1] == "connection"
    web.client.instances.standby(web.instance_id)
    assert web.client.instances.restore(web.instance_id).state == "Running"
    assert _wake_causes(fleet, web.instance_id, until="api")[-1] == "api"


def _wake_causes(fleet: Fleet, instance_id: str, *, until: str) -> list[str | None]:
    """The causes of the instance's Paused -> Running events, read from GET /events from
    the stream's start until one with cause ``until``."""
    causes: list[str | None] = []
    with (
        fleet.api.client() as http,
        http.stream(
            "GET", "/events", params={"instance": instance_id}, headers={"Last-Event-ID": "0"}
        ) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            if (event["previous"], event["state"]) == ("Paused", "Running"):
                causes.append(event.get("cause"))
                if causes[-1] == until:
                    return causes
    raise AssertionError(f"no wake with cause {until} among {causes}")


def test_a_restarted_worker_holds_the_ports_of_a_sleeping_instance(fleet: Fleet, web: Web) -> None:
    _asleep(web)
    fleet.worker.kill()
    fleet.worker.start()
    try:
        _wait_until_bound(web.port)  # the new worker holds the port again
        answer = _get_once(web.url)
        assert answer.status_code == 200
        assert answer.text.strip() == PAGE
        assert web.client.instances.get(web.instance_id).state == "Running"
    finally:
        if fleet.worker.proc is not None and fleet.worker.proc.poll() is not None:
            fleet.worker.start()


def test_a_restarted_worker_gives_back_a_forward_a_dead_one_never_handed_off(
    fleet: Fleet, web: Web
) -> None:
    """A worker killed between a wake and its hand-off leaves QEMU without the public
    forward (it went to the worker's own listener, now closed). Its successor adds it."""
    wait_for_instance(web.client, web.instance_id, lambda i: i.state == "Running")
    _wait_until_served(web.url)
    qmp_socket = fleet.worker.data_dir / "guests" / web.instance_id / "run" / "qmp.sock"
    _hmp(qmp_socket, f"hostfwd_remove net0 tcp:127.0.0.1:{web.port}")
    with pytest.raises(httpx.ConnectError):
        _get_once(web.url)  # what the dead worker left: nobody on the mapped port
    fleet.worker.kill()
    fleet.worker.start()
    _wait_until_served(web.url)
    assert _get_once(web.url).text.strip() == PAGE
    assert web.client.instances.get(web.instance_id).state == "Running"


def _hmp(qmp_socket: Path, command: str) -> str:
    """One HMP command through QEMU's QMP socket, as an operator would type it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(qmp_socket))
        stream = sock.makefile("rwb")
        stream.readline()
        for request in (
            {"execute": "qmp_capabilities"},
            {"execute": "human-monitor-command", "arguments": {"command-line": command}},
        ):
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            while "return" not in (reply := json.loads(stream.readline())):
                assert "error" not in reply, reply
        return str(reply["return"])
