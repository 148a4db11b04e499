"""user mode networking: a guest's httpd answers on a host port, across standby/restore;
ports are checked before anything is made and released on delete."""

from __future__ import annotations

import socket

import anyio
import httpx
import pytest

from cli.embedded_nats import free_port
from schemas.api import PortMapping
from schemas.errors import BadRequest, Conflict
from schemas.messages import Delete, Restore, Standby, Start, Stop
from tests.worker.conftest import create_command, now, wait_for_log
from worker.engine import HostEngine
from worker.network import USER_GUEST_IP

pytestmark = pytest.mark.anyio

HTTPD = (
    "mkdir -p /www && echo hello-from-the-guest > /www/index.html && exec httpd -f -p 80 -h /www"
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def udp_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def get_page(port: int, timeout_s: float = 60) -> str:
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(timeout_s):
            while True:
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/", timeout=2)
                    if response.status_code == 200:
                        return response.text
                except httpx.HTTPError:
                    pass
                await anyio.sleep(0.2)


@pytest.mark.vm
async def test_port_mapping_reaches_the_guest(engine: HostEngine, busybox_image: str) -> None:
    port, udp_port = free_port(), free_udp_port()
    cmd = create_command(
        busybox_image,
        cmd=["/bin/sh", "-c", HTTPD],
        port_mappings=[
            PortMapping(host_port=port, guest_port=80),
            PortMapping(host_port=udp_port, guest_port=5353, protocol="udp"),
        ],
    )
    record = await engine.execute(cmd)
    assert record is not None and record.network_enabled
    # busybox has no UDP server to answer through it; the VMM holds the host side.
    assert not udp_bindable(udp_port)
    assert record.ip == USER_GUEST_IP and record.mac is not None and record.mac.startswith("02:")
    assert (await get_page(port)).strip() == "hello-from-the-guest"

    # A second instance cannot take the same host port, and nothing of it is made.
    other = create_command(
        busybox_image, port_mappings=[PortMapping(host_port=port, guest_port=8080)]
    )
    with pytest.raises(Conflict) as refused:
        await engine.execute(other)
    assert refused.value.code == "port_in_use"
    assert not engine.ctx.storage.guest(other.instance_id).root.exists()

    await engine.execute(Standby(id="sb", instance_id=cmd.instance_id, issued_at=now()))
    restored = await engine.execute(Restore(id="rs", instance_id=cmd.instance_id, issued_at=now()))
    assert restored is not None and (restored.ip, restored.mac) == (record.ip, record.mac)
    assert (await get_page(port)).strip() == "hello-from-the-guest"

    await engine.execute(Stop(id="st", instance_id=cmd.instance_id, issued_at=now()))
    # A stopped instance keeps its mapping: the port stays reserved for it.
    with pytest.raises(Conflict):
        await engine.execute(
            create_command(busybox_image, port_mappings=[PortMapping(host_port=port, guest_port=1)])
        )
    # ... and gets it back when it starts again.
    await engine.execute(Start(id="sa", instance_id=cmd.instance_id, issued_at=now()))
    assert (await get_page(port)).strip() == "hello-from-the-guest"
    await engine.execute(Delete(id="dl", instance_id=cmd.instance_id, issued_at=now()))
    # Released: a new server can listen on it. SO_REUSEADDR as every server sets it, because
    # the connections QEMU closed first linger in TIME_WAIT on that port for a minute.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    assert udp_bindable(udp_port)


@pytest.mark.parametrize(
    "mappings",
    [
        [PortMapping(host_port=0, guest_port=80)],
        [PortMapping(host_port=70000, guest_port=80)],
        [PortMapping(host_port=8080, guest_port=0)],
        [PortMapping(host_port=18080, guest_port=80), PortMapping(host_port=18080, guest_port=81)],
    ],
)
async def test_invalid_port_mappings(
    engine: HostEngine, busybox_image: str, mappings: list[PortMapping]
) -> None:
    cmd = create_command(busybox_image, port_mappings=mappings)
    with pytest.raises(BadRequest) as refused:
        await engine.execute(cmd)
    assert refused.value.code == "invalid_port_mapping"
    assert not engine.ctx.storage.guest(cmd.instance_id).root.exists()


@pytest.mark.vm
async def test_network_disabled_means_no_nic(engine: HostEngine, busybox_image: str) -> None:
    script = "ls /sys/class/net; cat /etc/hosts; echo listed-$((6*7)); sleep 3600"
    cmd = create_command(
        busybox_image, cmd=["/bin/sh", "-c", script], network_enabled=False, name="loner"
    )
    record = await engine.execute(cmd)
    assert record is not None and (record.ip, record.mac) == (None, None)
    log = await wait_for_log(
        engine.instance(cmd.instance_id).guest.app_log, "[vmfleet] app started"
    )
    log = await wait_for_log(engine.instance(cmd.instance_id).guest.app_log, "listed-42")
    output = log.split("[vmfleet] app started", 1)[1]
    assert "eth0" not in output
    # Its own name resolves, as on any Linux machine, network or not.
    assert "127.0.0.1\tlocalhost" in output and "127.0.1.1\tloner" in output, output
