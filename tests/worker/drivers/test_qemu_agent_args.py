"""QEMU's agent channel: a named virtio-serial port on a unix socket, only for specs that
have one (a snapshot taken before there was an agent restores with the devices it had)."""

from __future__ import annotations

from pathlib import Path

from worker.drivers.base import DiskSpec, VmSpec
from worker.drivers.qemu import agent_endpoint, build_args


def _spec(tmp_path: Path, **changes: object) -> VmSpec:
    values: dict[str, object] = {
        "instance_id": "a1",
        "vcpus": 1,
        "memory_bytes": 256 << 20,
        "kernel": "/k",
        "initrd": "/i",
        "cmdline": "console=ttyS0",
        "disks": (DiskSpec(id="root", path="/r.img", readonly=True, serial="vmfleet-root"),),
        "serial_log": str(tmp_path / "app.log"),
        "run_dir": str(tmp_path / "run"),
    }
    values.update(changes)
    return VmSpec(**values)  # type: ignore[arg-type]


def test_a_spec_with_the_agent_channel_gets_the_named_port(tmp_path: Path) -> None:
    spec = _spec(tmp_path, agent_channel=True)
    args = build_args(spec, binary="qemu-system-x86_64")
    socket = tmp_path / "run" / "agent.sock"
    assert f"socket,id=agent,path={socket},server=on,wait=off" in args
    assert "virtio-serial-pci,id=vser" in args
    assert "virtserialport,bus=vser.0,chardev=agent,name=vmfleet.agent" in args
    endpoint = agent_endpoint(spec)
    assert endpoint is not None and endpoint.socket == str(socket)
    assert endpoint.vsock_port is None
    # A restore rebuilds the same command line from the spec alone.
    assert build_args(spec, binary="q", incoming=True)[1:-2] == build_args(spec, binary="q")[1:]


def test_a_spec_without_it_has_no_such_device(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert not any("virtserialport" in a for a in build_args(spec, binary="q"))
    assert agent_endpoint(spec) is None
