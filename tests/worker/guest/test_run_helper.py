"""The init's helper (guest-run/vmfleet-run.c), run on this host: it is a static binary, so
what it does to a process (environment, session, root, cwd, the program found in PATH, the
exit codes a shell would give) is the same here as in a guest."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from worker.guest.initrd import DEFAULT_RUNNER

BUSYBOX = "/bin/busybox"

pytestmark = pytest.mark.skipif(
    not DEFAULT_RUNNER.is_file(), reason="the init's helper is not built (scripts/install.sh)"
)


def run(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DEFAULT_RUNNER, *args], capture_output=True, text=True, timeout=timeout, env={}
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with busybox and a few applets, as an image would have them."""
    tree = tmp_path / "root"
    for d in ("bin", "usr/local/bin", "app", "data"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    for applet in ("sh", "env", "pwd", "cat", "echo"):
        (tree / "bin" / applet).symlink_to("busybox")
    return tree


def env_list(path: Path, **env: str) -> Path:
    path.write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in env.items()))
    return path


def test_exec_gives_the_program_its_root_cwd_env_and_pid_file(root: Path, tmp_path: Path) -> None:
    env = env_list(tmp_path / "env.list", PATH="/bin", GREETING="it's $x\nline two")
    pid_file = tmp_path / "app.pid"
    out = run("exec", "-e", env, "-p", pid_file, "-r", root, "-w", "/app", "-a", "--",
              "sh", "-c", 'echo "pwd=$(pwd) greeting=$GREETING"')  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"[vmfleet] app started pid={int(pid_file.read_text())}"
    assert lines[1:] == ["pwd=/app greeting=it's $x", "line two"]
    # Exactly the list's variables: none of the helper's caller (LEAK), none of a shell's.
    direct = subprocess.run(
        [DEFAULT_RUNNER, "exec", "-e", env, "-r", root, "--", "env", "-0"],
        capture_output=True,
        env={"LEAK": "1"},
        check=True,
    ).stdout
    assert direct.split(b"\0")[:-1] == [b"PATH=/bin", b"GREETING=it's $x\nline two"]


def test_exec_starts_a_new_session() -> None:
    out = run("exec", "-s", "--", BUSYBOX, "sh", "-c", 'echo "$$ $(cut -d" " -f6 /proc/$$/stat)"')
    pid, sid = out.stdout.split()
    assert pid == sid, out.stderr  # the helper's pid, which the shell kept, leads a session


def test_a_program_is_found_in_the_apps_path_and_keeps_its_name(root: Path, tmp_path: Path) -> None:
    tool = root / "usr/local/bin/tool"
    tool.write_text('#!/bin/sh\necho "argv0=$0 args=$*"\n')
    tool.chmod(0o755)
    env = env_list(tmp_path / "env.list", PATH="/usr/local/bin:/bin")
    out = run("exec", "-e", env, "-r", root, "--", "tool", "a b", "c")
    assert out.stdout == "argv0=/usr/local/bin/tool args=a b c\n", out.stderr


def test_a_script_without_interpreter_line_runs_under_the_roots_shell(
    root: Path, tmp_path: Path
) -> None:
    (root / "app/plain").write_text('echo "plain script ran with $1"\n')
    (root / "app/plain").chmod(0o755)
    out = run("exec", "-r", root, "-w", "/app", "--", "./plain", "arg")
    assert out.stdout == "plain script ran with arg\n", out.stderr


def test_missing_and_unexecutable_programs_exit_as_a_shell_would(
    root: Path, tmp_path: Path
) -> None:
    env = env_list(tmp_path / "env.list", PATH="/bin")
    missing = run("exec", "-e", env, "-r", root, "--", "no-such-program")
    assert missing.returncode == 127 and "no-such-program: not found" in missing.stderr
    (root / "bin/data.txt").write_text("not a program\n")
    denied = run("exec", "-e", env, "-r", root, "--", "data.txt")
    assert denied.returncode == 126 and "permission denied" in denied.stderr
    by_path = run("exec", "-e", env, "-r", root, "--", "/app")
    assert by_path.returncode == 126
    assert run("exec", "-r", root, "--", "/bin/nothing").returncode == 127


def test_bad_arguments_are_a_usage_error(tmp_path: Path) -> None:
    assert run("exec", "--").returncode == 2
    assert run("frobnicate").returncode == 2
    unreadable = run("exec", "-e", tmp_path / "missing", "--", BUSYBOX, "true")
    assert unreadable.returncode == 1 and "missing" in unreadable.stderr


def test_the_start_fifo_ends_when_the_program_runs(tmp_path: Path) -> None:
    """The init reads the FIFO until the program runs; on one vCPU it must not go first."""
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    marker = tmp_path / "ran"
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.append(fifo.read_bytes()))
    reader.start()
    out = run("exec", "-n", fifo, "--", BUSYBOX, "sh", "-c", f"echo yes > {marker}; sleep 0.2")
    reader.join(timeout=10)
    assert out.returncode == 0 and seen == [b""]
    assert marker.read_text() == "yes\n"
    # A failure before the program runs ends it too (no reader waits forever).
    reader = threading.Thread(target=lambda: seen.append(fifo.read_bytes()))
    reader.start()
    assert run("exec", "-n", fifo, "--", "/no/such").returncode == 127
    reader.join(timeout=10)
    assert not reader.is_alive()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare")
def test_net_sets_address_link_and_default_route(tmp_path: Path) -> None:
    """In a network namespace of its own, on a TAP interface: what `ip` would set."""
    script = (
        "ip tuntap add d0 mode tap && "
        f"{DEFAULT_RUNNER} net d0 10.77.0.2 24 10.77.0.1 && "
        "ip -4 -o addr show && ip route show && ip -o link show lo"
    )
    out = subprocess.run(
        ["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0 and "Operation not permitted" in out.stderr:
        pytest.skip("no network namespaces here")
    assert out.returncode == 0, out.stderr
    assert "d0    inet 10.77.0.2/24" in out.stdout
    assert "default via 10.77.0.1 dev d0" in out.stdout
    assert "10.77.0.0/24 dev d0" in out.stdout
    assert "lo    inet 127.0.0.1/8" in out.stdout and ",UP" in out.stdout.split("lo:")[-1]


def test_net_refuses_what_is_not_ipv4() -> None:
    assert run("net", "eth0", "fd00::2", "64", "-").returncode == 2
    assert run("net", "eth0", "10.0.0.2", "33", "-").returncode == 2
    assert run("net", "eth0", "10.0.0.2", "24", "gateway").returncode == 2
    assert run("net", "eth0").returncode == 2


def test_reseed_refuses_what_is_not_hex_bytes() -> None:
    for seed in ("", "abc", "zz", "00" * 513):
        out = run("reseed", seed)
        assert out.returncode == 2 and "hex bytes" in out.stderr, seed
    assert run("reseed").returncode == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="crediting entropy needs root, as in a guest")
def test_reseed_credits_the_seed_and_reseeds() -> None:
    """What a resumed guest's init runs before its disks are there (both ioctls succeed)."""
    out = run("reseed", os.urandom(32).hex())
    assert out.returncode == 0, out.stderr


def test_modules_loads_only_what_is_listed_for_the_given_devices(tmp_path: Path) -> None:
    """Lines for other devices are not tried; one that cannot be loaded is named, and the
    rest are still tried (these files are no modules: the kernel refuses them)."""
    listed = tmp_path / "module-devices"
    listed.write_text(
        f"boot first {tmp_path / 'missing.ko'}\n"
        f"boot second {tmp_path / 'also-missing.ko'}\n"
        f"0x1000 netdev {tmp_path / 'net.ko'}\n"
    )
    out = run("modules", listed, "0x1005")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    out = run("modules", listed, "boot")
    assert out.returncode == 1
    assert "first:" in out.stderr and "second:" in out.stderr and "netdev" not in out.stderr


@pytest.mark.skipif(not Path("/sys/module/printk").is_dir(), reason="no /sys/module/printk")
def test_modules_skips_what_the_kernel_has_already(tmp_path: Path) -> None:
    """Its file is not even opened (printk is in every kernel, and shows in /sys/module)."""
    listed = tmp_path / "module-devices"
    listed.write_text(f"boot printk {tmp_path / 'printk.ko'}\n")
    out = run("modules", listed, "boot")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_modules_needs_a_list() -> None:
    assert run("modules").returncode == 2
    out = run("modules", "/no/such/list", "boot")
    assert out.returncode == 1 and "/no/such/list" in out.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare")
def test_mount_mounts_each_fstab_entry_and_makes_the_dev_links(tmp_path: Path) -> None:
    """In a mount namespace of its own: a missing mount point is made, options that are
    flags become flags (ro) and the rest goes to the filesystem (mode); the links come after
    the mounts (into the /dev mounted by the fstab)."""
    links = tmp_path / "links"
    links.mkdir()
    (links / "fd").symlink_to("/proc/self/fd")
    target = tmp_path / "mnt" / "data"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "devtmpfs-stand-in /dev tmpfs mode=755 0 0\n"
        f"scratch {tmp_path / 'mnt'} tmpfs mode=711 0 0\n"
        f"data {target} tmpfs ro,nosuid,size=1m 0 0\n"
    )
    script = (
        f"{DEFAULT_RUNNER} mount -l {links} {fstab} && "
        f"grep ' {target} ' /proc/mounts && stat -c %a {tmp_path / 'mnt'} && readlink /dev/fd"
    )
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0 and "Operation not permitted" in out.stderr:
        pytest.skip("no mount namespaces here")
    assert out.returncode == 0, out.stderr
    mounted, mode, fd_link = out.stdout.splitlines()
    assert mounted.split()[2] == "tmpfs"
    assert mounted.split()[3].split(",")[:2] == ["ro", "nosuid"] and "size=1024k" in mounted
    assert mode == "711"
    assert fd_link == "/proc/self/fd"


def test_mount_names_the_entry_it_could_not_mount(tmp_path: Path) -> None:
    fstab = tmp_path / "fstab"
    fstab.write_text(f"nothing {tmp_path / 'here'} no-such-fs defaults 0 0\n")
    out = run("mount", fstab)
    assert out.returncode == 1 and str(tmp_path / "here") in out.stderr
    assert run("mount", tmp_path / "no-fstab").returncode == 1
