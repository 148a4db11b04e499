"""A real guest boot under QEMU (TCG): vmfleet's kernel, initrd, init.sh and config disk.

The app prints an env var and its cwd, then counts; the host talks to the control channel
(ttyS1 on a unix socket): ping, status, shutdown. QEMU must then exit by itself and the
app must have seen SIGTERM.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from worker.guest import GuestConfig, KernelAssets, build_config_disk, ensure_initrd, ensure_kernel
from worker.guest.initrd import DEFAULT_RUNNER

pytestmark = pytest.mark.vm

BOOT_TIMEOUT_S = 90.0
GREETING = "hello 'guest' $HOME \"quoted\""

APP = """\
#!/bin/sh
trap 'echo "app: got SIGTERM"; exit 0' TERM
echo "app: GREETING=[$GREETING]"
echo "app: pwd=$(pwd)"
echo "app: argv=$*"
i=0
while :; do
  i=$((i + 1))
  echo "app: tick $i"
  sleep 1 &
  wait $!
done
"""


@dataclass(frozen=True)
class Guest:
    process: subprocess.Popen[bytes]
    app_log: Path
    control: Path
    started: float


def _make_rootfs(work: Path) -> Path:
    tree = work / "rootfs"
    (tree / "bin").mkdir(parents=True)
    (tree / "app").mkdir()
    (tree / "etc").mkdir()
    shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
    for applet in ("sh", "echo", "sleep", "pwd", "cat"):
        (tree / "bin" / applet).symlink_to("busybox")
    app = tree / "app" / "run.sh"
    app.write_text(APP)
    app.chmod(0o755)
    image = work / "rootfs.ext4"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )
    return image


def _make_overlay(work: Path) -> Path:
    image = work / "overlay.ext4"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    return image


@pytest.fixture(scope="session")
def guest_kernel(test_assets: Path) -> KernelAssets:
    return anyio.run(ensure_kernel, test_assets)


def _qemu_args(
    work: Path, kernel: KernelAssets, initrd: Path, disks: list[tuple[Path, bool]]
) -> list[str]:
    args = [
        "qemu-system-x86_64",
        "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none",
        "-kernel", str(kernel.bzimage), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        # SeaBIOS stays off the serial port, so app.log starts with the init's first line.
        "-fw_cfg", "name=etc/sercon-port,string=0",
    ]  # fmt: skip
    for i, (path, readonly) in enumerate(disks):
        ro = "on" if readonly else "off"
        args += ["-drive", f"file={path},format=raw,if=none,id=disk{i},readonly={ro}"]
        args += ["-device", f"virtio-blk-pci,drive=disk{i}"]
    args += [
        "-serial", f"file:{work / 'app.log'}",
        "-chardev", f"socket,id=ctl,path={work / 'ctl.sock'},server=on,wait=off",
        "-serial", "chardev:ctl",
    ]  # fmt: skip
    return args


@pytest.fixture(params=["helper", "busybox-only"])
def guest(
    request: pytest.FixtureRequest, tmp_path: Path, guest_kernel: KernelAssets, test_assets: Path
) -> Iterator[Guest]:
    """The init with its helper (vmfleet-run), and without: an initrd built where the helper
    was not, which starts the app with busybox alone."""
    runner = DEFAULT_RUNNER if request.param == "helper" else None
    initrd = anyio.run(functools.partial(ensure_initrd, test_assets, guest_kernel, runner=runner))
    config = GuestConfig(
        entrypoint=("/app/run.sh",),
        cmd=("one", "two words"),
        workdir="/app",
        env={"GREETING": GREETING},
    )
    config_disk = tmp_path / "config.ext4"
    anyio.run(build_config_disk, config_disk, config)
    disks = [(_make_rootfs(tmp_path), True), (_make_overlay(tmp_path), False), (config_disk, True)]
    args = _qemu_args(tmp_path, guest_kernel, initrd, disks)
    vmm_log = (tmp_path / "vmm.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=vmm_log, stderr=vmm_log,
                            start_new_session=True)  # fmt: skip
    try:
        yield Guest(proc, tmp_path / "app.log", tmp_path / "ctl.sock", started)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        vmm_log.close()


def _wait_for(path: Path, needle: str, timeout: float, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        assert proc.poll() is None, f"QEMU exited early ({proc.returncode}):\n{text}"
        time.sleep(0.1)
    text = path.read_text(errors="replace") if path.exists() else "<no app.log>"
    raise AssertionError(f"{needle!r} not seen within {timeout}s; app.log:\n{text}")


class Control:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""

    def call(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(
                    f"control channel closed while waiting for a reply to {line!r}"
                )
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n")
        return reply.decode()

    def close(self) -> None:
        self.sock.close()


def test_boot_run_app_and_shutdown(guest: Guest) -> None:
    log = _wait_for(guest.app_log, "app: tick 1", BOOT_TIMEOUT_S, guest.process)
    assert f"app: GREETING=[{GREETING}]" in log
    assert "app: pwd=/app" in log
    assert "app: argv=one two words" in log
    assert "[vmfleet] app started pid=" in log
    # The modules and mounts of the boot took no second try (with the helper or busybox).
    assert "[INFO] [modules] loaded" in log
    complaints = [
        line
        for line in log.splitlines()
        if ("[WARN]" in line or "[ERROR]" in line or "vmfleet-run:" in line)
        and "[agent]" not in line  # this config disk holds no agent
    ]
    assert complaints == []

    control = Control(guest.control)
    try:
        assert control.call("ping") == "pong"
        status = control.call("status")
        assert status.startswith("running "), status
        assert f"[vmfleet] app started pid={status.split()[1]}" in log
        assert control.call("frobnicate").startswith("err ")
        assert control.call("shutdown 5") == "ok"
    finally:
        control.close()

    assert guest.process.wait(timeout=60) == 0
    log = guest.app_log.read_text(errors="replace")
    assert "app: got SIGTERM" in log
    assert "[vmfleet] app exited with code 0" in log
