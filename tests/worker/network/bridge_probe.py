"""Run by test_bridge_mode.py *inside* a test network namespace (``ip netns exec``): a bridge
mode engine creates a busybox httpd VM, the probe checks what answers from the namespace,
then prints one ``RESULT {json}`` line. Nothing here may run outside such a namespace."""

from __future__ import annotations

import http.server
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx

from schemas.api import Hypervisor, InstanceState, PortMapping
from schemas.autostandby import AutoStandbySpec
from schemas.clock import utc_now as now
from schemas.messages import Create, Delete, HealthCheckSpec, Restore, Standby, Update
from tests.worker.network.namespace import probe_main
from worker.drivers.qemu import QemuDriver
from worker.engine import HostEngine
from worker.health import supervise_health
from worker.health_probe import probe_target
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.network import BridgeNetwork, NetworkSettings
from worker.storage import Storage
from worker.volumes import VolumeStore
from worker.wake import attach_wake

SUBNET, GATEWAY, BRIDGE = "10.123.0.0/24", "10.123.0.1", "vftestbr0"
HOST_PORT, EGRESS_PORT = 18080, 8099
GUEST_CMD = (
    "mkdir -p /www; echo hello-from-the-guest > /www/index.html; "
    f"(until wget -q -O /www/egress.txt http://{GATEWAY}:{EGRESS_PORT}/; do sleep 1; done) & "
    "exec httpd -f -p 80 -h /www"
)


async def get(url: str, timeout_s: float = 90) -> str:
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(timeout_s):
            while True:
                try:
                    response = await client.get(url, timeout=2)
                    if response.status_code == 200:
                        return response.text.strip()
                except httpx.HTTPError:
                    pass
                await anyio.sleep(0.3)


async def health_through_the_bridge(engine: HostEngine, instance_id: str) -> dict[str, object]:
    """The worker's own health loop, given an http check of guest port 80: where it
    probes, and what it finds (bridge mode: the guest's address, not the port mapping)."""
    check = HealthCheckSpec(type="http", port=80, interval_s=0.5, timeout_s=5, start_period_s=0)
    await engine.execute(
        Update(id="u1", instance_id=instance_id, issued_at=now(), health_check=check)
    )
    record = engine.get(instance_id)
    target = probe_target(record, 80, bridge=True, publish_addr=engine.ctx.network.publish_addr)
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervise_health, engine)
        with anyio.move_on_after(60):
            while engine.get(instance_id).health.status != "healthy":
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    health = engine.get(instance_id).health
    return {"target": list(target), "status": health.status, "error": health.last_error}


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def nft_table() -> str:
    done = subprocess.run(["nft", "list", "table", "inet", "vmfleet"], capture_output=True)
    return done.stdout.decode()


def serve_egress_target() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"egress-ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((GATEWAY, EGRESS_PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def sleep_rules(instance_id: str) -> list[str]:
    return [line.strip() for line in nft_table().splitlines() if f"vmfleet:{instance_id}" in line]


async def catch_port(instance_id: str) -> int:
    """The worker's port the sleep's rules redirect the guest's address to, once they
    replaced the instance's DNAT rules (a recovery puts those back first)."""
    with anyio.fail_after(30):
        while True:
            rules = sleep_rules(instance_id)
            ports = [m[1] for rule in rules if (m := re.search(r"redirect to :(\d+)", rule))]
            if ports and not any("dnat" in rule for rule in rules):
                return int(ports[0])
            await anyio.sleep(0.05)


async def get_from_another_host(url: str) -> str:
    """One GET from a namespace of its own, routed to the subnet through this one."""
    client = f"vfcli-{secrets.token_hex(3)}"
    setup = [
        ["ip", "netns", "add", client],
        ["ip", "link", "add", "vfcli0", "type", "veth", "peer", "name", "vfcli1", "netns", client],
        ["ip", "addr", "add", "10.125.0.1/24", "dev", "vfcli0"],
        ["ip", "link", "set", "vfcli0", "up"],
        ["ip", "-n", client, "addr", "add", "10.125.0.2/24", "dev", "vfcli1"],
        ["ip", "-n", client, "link", "set", "vfcli1", "up"],
        ["ip", "-n", client, "route", "add", SUBNET, "via", "10.125.0.1"],
    ]
    fetch = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=120).read())"
    try:
        for argv in setup:
            await anyio.run_process(argv)
        done = await anyio.run_process(
            ["ip", "netns", "exec", client, sys.executable, "-c", fetch, url], check=False
        )
        return done.stdout.decode().strip() or done.stderr.decode()[-500:]
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["ip", "link", "del", "vfcli0"], check=False)
            await anyio.run_process(["ip", "netns", "del", client], check=False)


async def wake_that_fails_once(
    engine: HostEngine, instance_id: str, guest_ip: str
) -> dict[str, object]:
    """Asleep with its snapshot's memory out of reach: the wake fails, the caught connection
    is closed (not left hanging) and the redirect is back; with the memory back, the next
    connection (after the backoff) wakes it."""
    out: dict[str, object] = {}
    await engine.execute(Standby(id="s4", instance_id=instance_id, issued_at=now()))
    await catch_port(instance_id)
    memory = engine.instance(instance_id).guest.snapshot / "memory"
    memory.rename(memory.with_name("memory.hidden"))
    async with httpx.AsyncClient() as client:
        try:
            response = await client.get(f"http://{guest_ip}/", timeout=60)
            out["failed_wake"] = f"answered {response.status_code}"
        except httpx.HTTPError as exc:
            out["failed_wake"] = type(exc).__name__
        await catch_port(instance_id)
        out["rules_after_failure"] = len(sleep_rules(instance_id))
        out["state_after_failure"] = str(engine.get(instance_id).state.value)
        memory.with_name("memory.hidden").rename(memory)
        response = await client.get(f"http://{guest_ip}/", timeout=120)
        out["page_after_failure"] = [response.status_code, response.text.strip()]
    out["state_after_retry"] = str(engine.get(instance_id).state.value)
    return out


async def wake_by_guest_address(
    engine: HostEngine, new_ctx: OpContext, instance_id: str, guest_ip: str
) -> tuple[dict[str, object], HostEngine]:
    """An instance put to sleep under its auto_standby policy; the worker 'dies' (its
    wake manager and ports gone, its rules left); a new one recovers, sets the rules of
    the sleep again, and a GET to the guest's own address (port 80, not a mapped port)
    wakes the instance and gets the guest's page. Returns the new worker's engine."""
    out: dict[str, object] = {}
    policy = AutoStandbySpec(enabled=True, idle_timeout="1h0m0s", idle_timeout_s=3600)
    wake = attach_wake(engine, on_woke=lambda cause, seconds: None)
    async with anyio.create_task_group() as tg:
        await tg.start(wake.run)
        await engine.execute(
            Update(id="u2", instance_id=instance_id, issued_at=now(), auto_standby=policy)
        )
        await engine.execute(Standby(id="s2", instance_id=instance_id, issued_at=now()))
        await catch_port(instance_id)
        out["held"] = wake.holds(instance_id)
        out["rules_asleep"] = len(sleep_rules(instance_id))
        out["dnat_asleep"] = sum("dnat" in rule for rule in sleep_rules(instance_id))
        tg.cancel_scope.cancel()
    engine = HostEngine(new_ctx)
    wake = attach_wake(engine, on_woke=lambda cause, seconds: None)
    async with anyio.create_task_group() as tg:
        await tg.start(wake.run)
        await engine.recover()
        wake.arm_sleeping()
        await catch_port(instance_id)
        out["rules_after_restart"] = len(sleep_rules(instance_id))
        async with httpx.AsyncClient() as client:  # one request, no retry
            started = time.monotonic()
            response = await client.get(f"http://{guest_ip}/", timeout=120)
            out["wake_ms"] = round((time.monotonic() - started) * 1000)
        out["page"] = [response.status_code, response.text.strip()]
        out["state"] = str(engine.get(instance_id).state.value)
        with anyio.fail_after(60):
            while wake.holds(instance_id):
                await anyio.sleep(0.05)
        out["rules_awake"] = [
            "dnat" if "dnat" in rule else "redirect" if "redirect" in rule else rule
            for rule in sleep_rules(instance_id)
        ]
        out["page_awake"] = await get(f"http://{guest_ip}/", timeout_s=15)
        # Asleep again; now a client routed through this host (prerouting, not output).
        await engine.execute(Standby(id="s3", instance_id=instance_id, issued_at=now()))
        await catch_port(instance_id)
        out["page_routed"] = await get_from_another_host(f"http://{guest_ip}/")
        out["state_routed"] = str(engine.get(instance_id).state.value)
        out.update(await wake_that_fails_once(engine, instance_id, guest_ip))
        tg.cancel_scope.cancel()
    assert engine.get(instance_id).state is InstanceState.RUNNING
    return out, engine


async def probe(args: dict[str, str]) -> dict[str, object]:
    data_dir = Path(args["data_dir"])
    result: dict[str, object] = {}
    settings = NetworkSettings(mode="bridge", subnet=SUBNET, bridge=BRIDGE)
    bridge = BridgeNetwork(settings, data_dir)
    await bridge.setup()
    serve_egress_target()

    def make_ctx() -> OpContext:
        return OpContext(
            host_id="test-host",
            storage=Storage(data_dir),
            driver=QemuDriver(),
            images=ImageCache(data_dir / "images"),
            volumes=VolumeStore(data_dir, "test-host"),
            boot=BootAssets(Path(args["kernel"]), Path(args["initrd"]), args["accel"]),
            network=settings,
            bridge=bridge,
        )

    ctx = make_ctx()
    engine = HostEngine(ctx)
    instance_id = "bridgeprobe" + now().strftime("%H%M%S%f")
    record = await engine.execute(
        Create(
            id="c1",
            instance_id=instance_id,
            issued_at=now(),
            name="web",
            image=args["image"],
            size_bytes=256 << 20,
            overlay_bytes=256 << 20,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
            cmd=["/bin/sh", "-c", GUEST_CMD],
            port_mappings=[PortMapping(host_port=HOST_PORT, guest_port=80)],
        )
    )
    assert record is not None
    result["created"] = {"ip": record.ip, "mac": record.mac, "tap": record.tap}
    result["tap_on_bridge"] = f"{record.tap}:" in links() and f"master {BRIDGE}" in links()
    result["guest_ip"] = await get(f"http://{record.ip}/")
    result["dnat_gateway"] = await get(f"http://{GATEWAY}:{HOST_PORT}/", timeout_s=15)
    result["dnat_loopback"] = await get(f"http://127.0.0.1:{HOST_PORT}/", timeout_s=15)
    result["egress"] = await get(f"http://{record.ip}/egress.txt")
    result["rules_while_running"] = nft_table().count(f"vmfleet:{instance_id}")
    result["health"] = await health_through_the_bridge(engine, instance_id)

    # A TCP connection opened before standby, used after restore.
    conn = socket.create_connection((str(record.ip), 80), timeout=10)
    await engine.execute(Standby(id="s1", instance_id=instance_id, issued_at=now()))
    result["tap_in_standby"] = f"{record.tap}:" in links()
    result["lease_in_standby"] = bridge.ipam.lease(instance_id) is not None
    restored = await engine.execute(Restore(id="r1", instance_id=instance_id, issued_at=now()))
    assert restored is not None
    result["restored"] = {"ip": restored.ip, "mac": restored.mac, "tap": restored.tap}
    spec = engine.instance(instance_id).spec
    assert spec is not None
    result["restored_nic"] = {"mac": spec.nics[0].mac, "tap": spec.nics[0].tap}
    result["guest_ip_after_restore"] = await get(f"http://{restored.ip}/")
    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
    reply = b""
    with conn:
        while chunk := conn.recv(4096):
            reply += chunk
    result["old_connection"] = reply.decode(errors="replace").splitlines()[0] if reply else ""
    result["dnat_after_restore"] = await get(f"http://{GATEWAY}:{HOST_PORT}/", timeout_s=15)
    ctx = make_ctx()
    result["wake"], engine = await wake_by_guest_address(engine, ctx, instance_id, str(record.ip))

    await engine.execute(Delete(id="d1", instance_id=instance_id, issued_at=now()))
    result["taps_after_delete"] = [
        line for line in links().splitlines() if f": {record.tap}" in line or "master " in line
    ]
    result["rules_after_delete"] = nft_table().count("vmfleet:")
    result["leases_after_delete"] = [lease.instance_id for lease in bridge.ipam.leases()]

    # What a worker killed mid-delete leaves behind (a TAP, rules and a lease of an instance
    # whose files are gone) is removed by the next worker when it starts.
    ghost, ghost_tap = "ghost" + now().strftime("%H%M%S%f"), "vfghost0"
    bridge.lease(ghost)
    await bridge.plug(ghost, ghost_tap, [PortMapping(host_port=HOST_PORT + 1, guest_port=80)])
    result["ghost_left"] = {
        "tap": f"{ghost_tap}:" in links(),
        "rules": nft_table().count(f"vmfleet:{ghost}"),
        "lease": bridge.ipam.lease(ghost) is not None,
    }
    await HostEngine(ctx).recover()
    result["ghost_after_restart"] = {
        "tap": f"{ghost_tap}:" in links(),
        "rules": nft_table().count(f"vmfleet:{ghost}"),
        "lease": bridge.ipam.lease(ghost) is not None,
    }
    return result


def main() -> None:
    probe_main(
        probe,
        {
            "neigh": ["ip", "neigh"],
            "addr": ["ip", "-o", "addr"],
            "ping": ["busybox", "ping", "-c", "2", "-W", "1", "10.123.0.2"],
            "ruleset": ["nft", "list", "ruleset"],
        },
    )


if __name__ == "__main__":
    main()
