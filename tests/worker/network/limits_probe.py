"""Run by test_limits.py *inside* a test network namespace (``ip netns exec``): two guests in
bridge mode, one with ``disk_io_bps`` and both bandwidth limits, one without; each writes
to its disk, downloads from and uploads to a server in the namespace; the probe reports
what each measured, then stops and starts the limited one. Prints one ``RESULT {json}``
line. Nothing here may run outside such a namespace.

Every rate is measured where the bytes arrive: the disk and the download by the guest
(``/proc/uptime`` before and after, printed to its app log), the upload by the server here.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import anyio

from schemas.api import Hypervisor
from schemas.messages import Create, Delete, Start, Stop
from tests.worker.network.bridge_probe import links, now
from tests.worker.network.namespace import probe_main
from worker.drivers.qemu import QemuDriver
from worker.engine import HostEngine
from worker.images import ImageCache
from worker.lifecycle.context import BootAssets, OpContext
from worker.network import BridgeNetwork, NetworkSettings
from worker.storage import Storage
from worker.volumes import VolumeStore

SUBNET, GATEWAY, BRIDGE = "10.124.0.0/24", "10.124.0.1", "vftestbr1"
DOWN_PORT, UP_PORT = 9100, 9101
DISK_BYTES = 24 << 20
NET_BYTES = 1 << 20
LIMITS = {
    "disk_io_bps": 1 << 20,
    "bandwidth_download_bps": 128 << 10,
    "bandwidth_upload_bps": 128 << 10,
}
#: The guest prints ``MEASURED ...`` lines; the word is split in the script, because the
#: guest's init logs the command itself too.
GUEST_CMD = f"""
t() {{ read u _ < /proc/uptime; echo $u; }}
m=MEASU
s=$(t); dd if=/dev/zero of=/ddtest bs=64k count={DISK_BYTES >> 16} conv=fsync 2>/dev/null; e=$(t)
echo "${{m}}RED disk {DISK_BYTES} $s $e"
s=$(t); n=$(nc {GATEWAY} {DOWN_PORT} | wc -c); e=$(t)
echo "${{m}}RED down $n $s $e"
dd if=/dev/zero bs=64k count={NET_BYTES >> 16} 2>/dev/null | nc {GATEWAY} {UP_PORT}
echo "${{m}}RED done"
exec sleep 3600
"""


class Server:
    """Sends NET_BYTES to whoever connects to DOWN_PORT; times NET_BYTES arriving on UP_PORT,
    by the sender's address."""

    def __init__(self) -> None:
        self.upload_seconds: dict[str, float] = {}
        for port, handler in ((DOWN_PORT, self._send), (UP_PORT, self._receive)):
            listener = socket.create_server((GATEWAY, port))
            threading.Thread(target=self._serve, args=(listener, handler), daemon=True).start()

    def _serve(self, listener: socket.socket, handler: object) -> None:
        while True:
            conn, peer = listener.accept()
            threading.Thread(target=handler, args=(conn, peer[0]), daemon=True).start()

    def _send(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.sendall(b"\0" * NET_BYTES)

    def _receive(self, conn: socket.socket, peer: str) -> None:
        got, first = 0, None
        with conn:
            while got < NET_BYTES and (chunk := conn.recv(65536)):
                first = first or time.monotonic()
                got += len(chunk)
            if first is not None and got >= NET_BYTES:
                self.upload_seconds[peer] = time.monotonic() - first


async def measurements(app_log: Path, timeout_s: float = 400) -> dict[str, float]:
    """Bytes/s of the guest's disk write and download, once it has printed both."""
    with anyio.fail_after(timeout_s):
        while "MEASURED done" not in (text := app_log.read_text(errors="replace")):
            await anyio.sleep(0.5)
    rates = {}
    for kind, count, start, end in re.findall(r"MEASURED (\w+) (\d+) ([\d.]+) ([\d.]+)", text):
        rates[kind] = int(count) / max(float(end) - float(start), 0.01)
    return rates


def shapers(tap: str) -> dict[str, object]:
    qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", tap], capture_output=True, text=True)
    return {
        "tbf_on_tap": " tbf " in qdiscs.stdout,
        "ingress_on_tap": "ingress" in qdiscs.stdout,
        "ifb": f"vi{tap[2:]}:" in links(),
    }


async def probe(args: dict[str, str]) -> dict[str, object]:
    data_dir = Path(args["data_dir"])
    settings = NetworkSettings(mode="bridge", subnet=SUBNET, bridge=BRIDGE)
    bridge = BridgeNetwork(settings, data_dir)
    await bridge.setup()
    server = Server()
    ctx = OpContext(
        host_id="test-host",
        storage=Storage(data_dir),
        driver=QemuDriver(),
        images=ImageCache(data_dir / "images"),
        volumes=VolumeStore(data_dir, "test-host"),
        boot=BootAssets(Path(args["kernel"]), Path(args["initrd"]), args["accel"]),
        network=settings,
        bridge=bridge,
    )
    engine = HostEngine(ctx)
    stamp = now().strftime("%H%M%S%f")

    def create(instance_id: str, limits: dict[str, int]) -> Create:
        return Create(
            id=f"c-{instance_id}",
            instance_id=instance_id,
            issued_at=now(),
            name=instance_id,
            image=args["image"],
            size_bytes=256 << 20,
            overlay_bytes=256 << 20,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
            cmd=["/bin/sh", "-c", GUEST_CMD],
            **limits,  # type: ignore[arg-type]
        )

    ids = {"limited": "limited" + stamp, "free": "free" + stamp}
    async with anyio.create_task_group() as group:
        group.start_soon(engine.execute, create(ids["limited"], LIMITS))
        group.start_soon(engine.execute, create(ids["free"], {}))
    result: dict[str, object] = {}
    for kind, instance_id in ids.items():
        inst = engine.instance(instance_id)
        rates = await measurements(inst.guest.app_log)
        assert inst.record.ip is not None
        upload_s = server.upload_seconds.get(inst.record.ip)
        rates["up"] = NET_BYTES / upload_s if upload_s else 0.0
        result[kind] = rates
        result[f"{kind}_log"] = inst.guest.app_log.read_text(errors="replace")[-1500:]
    limited = engine.instance(ids["limited"])
    tap = limited.record.tap
    assert tap is not None
    result["shapers_running"] = shapers(tap)

    # Stop and start: the address stays the instance's, and the limits come back with the TAP.
    before = {"ip": limited.record.ip, "mac": limited.record.mac}
    stopped = await engine.execute(Stop(id="s1", instance_id=ids["limited"], issued_at=now()))
    assert stopped is not None
    result["address_stopped"] = {"ip": stopped.ip, "mac": stopped.mac}
    result["lease_stopped"] = bridge.ipam.lease(ids["limited"]) is not None
    result["shapers_stopped"] = shapers(tap)
    started = await engine.execute(Start(id="t1", instance_id=ids["limited"], issued_at=now()))
    assert started is not None
    result["address_before"] = before
    result["address_started"] = {"ip": started.ip, "mac": started.mac}
    result["shapers_started"] = shapers(tap)
    for instance_id in ids.values():
        await engine.execute(
            Delete(id=f"d-{instance_id}", instance_id=instance_id, issued_at=now())
        )
    result["shapers_deleted"] = shapers(tap)
    result["leases_deleted"] = [lease.instance_id for lease in bridge.ipam.leases()]
    return result


def main() -> None:
    probe_main(probe)


if __name__ == "__main__":
    main()
