"""The guest agent's channel under Cloud Hypervisor, through the CH API double.

The double emulates CH's hybrid vsock (``CONNECT <port>`` on the device's unix socket) and
carries the bytes to the real agent binary, run on the host with ``-channel unix:PATH`` in
place of the guest: so the hub's handshake, the driver's vsock config and the agent's
protocol are all the real ones; only the VM is pretend.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.support.ch import RequestLog
from tests.worker.drivers.test_cloud_hypervisor import make_spec
from worker.agent import AgentHub, AgentUnavailable, Frame
from worker.drivers.base import AGENT_VSOCK_PORT
from worker.drivers.cloud_hypervisor import CloudHypervisorDriver
from worker.guest import DEFAULT_AGENT

pytestmark = pytest.mark.anyio


@pytest.fixture
def guest_agent(vm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The agent, listening where the double forwards vsock connections to."""
    if not DEFAULT_AGENT.is_file():
        pytest.fail(f"no agent at {DEFAULT_AGENT}: run scripts/install.sh")
    path = vm_dir / "guest-agent.sock"
    process = subprocess.Popen([str(DEFAULT_AGENT), "-channel", f"unix:{path}"])
    try:
        monkeypatch.setenv("CH_DOUBLE_VSOCK_FORWARD", str(path))
        yield path
    finally:
        process.kill()
        process.wait()


async def echo(hub: AgentHub, text: str) -> bytes:
    async with await hub.open_session("chtest", "exec", wait_s=10) as session:
        await session.send(Frame.json({"command": ["echo", text], "tty": False}))
        out = b""
        try:
            while True:
                frame = await session.receive()
                if frame.text:
                    assert json.loads(frame.data) == {"exitCode": 0}
                else:
                    out += frame.data
        except anyio.EndOfStream:
            return out


async def test_exec_through_the_hybrid_vsock_and_again_after_restore(
    ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path, guest_agent: Path
) -> None:
    driver = CloudHypervisorDriver(
        binary=str(Path(__file__).parents[2] / "support" / "bin" / "cloud-hypervisor")
    )
    spec = make_spec(vm_dir, ch_kernel, agent_channel=True)
    vmm_log = vm_dir / "logs" / "vmm.log"
    process = await driver.boot(spec, vmm_log=vmm_log)
    endpoint = driver.agent_endpoint(spec)
    assert endpoint is not None and endpoint.vsock_port == AGENT_VSOCK_PORT
    config = ch_requests.bodies("vm.create")[0]
    assert config["vsock"] == {"cid": 3, "socket": str(vm_dir / "run" / "agent.vsock")}
    assert "vmfleet.agent=vsock" in config["payload"]["cmdline"].split()
    async with AgentHub() as hub:
        hub.attach("chtest", endpoint)
        assert await echo(hub, "before") == b"before\n"
        # Standby: the hub lets go first (the lifecycle detaches at Paused), then restore.
        hub.detach("chtest", "the instance is going to standby")
        snapshot = vm_dir / "snapshot"
        snapshot.mkdir()
        await driver.snapshot(spec, process, snapshot)
        with pytest.raises(AgentUnavailable, match="standby"):
            await hub.open_session("chtest", "exec")
        restored = await driver.restore(spec, snapshot, vmm_log=vmm_log)
        try:
            hub.attach("chtest", driver.agent_endpoint(spec))
            assert await echo(hub, "after") == b"after\n"
        finally:
            hub.detach("chtest")
            assert await driver.power_off(spec, restored, timeout_s=5)


async def test_without_a_guest_agent_the_pretend_one_answers_and_refuses_sessions(
    ch_requests: RequestLog, vm_dir: Path, ch_kernel: Path
) -> None:
    driver = CloudHypervisorDriver(
        binary=str(Path(__file__).parents[2] / "support" / "bin" / "cloud-hypervisor")
    )
    spec = make_spec(vm_dir, ch_kernel, agent_channel=True)
    process = await driver.boot(spec, vmm_log=vm_dir / "logs" / "vmm.log")
    try:
        async with AgentHub() as hub:
            hub.attach("chtest", driver.agent_endpoint(spec))
            await hub.wait_ready("chtest", 10)  # readiness, as the lifecycle waits for it
            session = await hub.open_session("chtest", "exec")
            with pytest.raises(Exception, match="runs no guest"):
                await session.receive()
    finally:
        assert await driver.power_off(spec, process, timeout_s=5)
