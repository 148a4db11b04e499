"""exec, cp and stat into real guests through hypeman's SDK, unchanged (``hypeman.lib``
and ``client.instances.stat``), on a real worker and gateway.

One guest serves every test that only reads or writes its own scratch paths; a second
one is made only where a test changes its state (stop, standby) and the worker restart
comes last.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pty
import resource
import secrets
import select
import signal
import stat
import struct
import subprocess
import tarfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import anyio
import httpx
import pytest
from hypeman import AsyncHypeman, Hypeman
from hypeman.lib import (
    CopyProtocolError,
    ExecProtocolError,
    cp_from_instance,
    cp_to_instance,
    exec,
    exec_async,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.gateway.conftest import Fleet
from tests.support.fleet import VMFLEET
from tests.support.gateway import SECRET

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Hypeman:
    return Hypeman(api_key=fleet.api.token, base_url=fleet.api.base_url, max_retries=0)


@pytest.fixture(scope="module")
def guest(fleet: Fleet, client: Hypeman, busybox_image: str) -> Iterator[str]:
    """A busybox guest shared by the tests that do not change its state."""
    created = client.instances.create(
        name="exec-" + secrets.token_hex(3),
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["/bin/sh", "-c", "sleep 100000"],
    )
    assert created.state == "Running"
    yield created.id
    client.instances.delete(created.id)


def _ws_url(fleet: Fleet, instance: str, endpoint: str = "exec") -> str:
    return fleet.api.base_url.replace("http://", "ws://") + f"/instances/{instance}/{endpoint}"


#: Every process's argv, NUL-separated (busybox here has no pgrep).
_PROCESSES: Final = ["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null; true"]


def _running(client: Hypeman, guest: str, argv: bytes) -> bool:
    """Whether a process whose argv starts with ``argv`` (NUL-separated) runs in the guest."""
    listing = exec(client, guest, _PROCESSES).output
    return listing.startswith(argv) or b"\x00" + argv in listing


# -- exec ------------------------------------------------------------------------------------


def test_output_exit_code_and_stderr_merged(client: Hypeman, guest: str) -> None:
    result = exec(client, guest, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result.exit_code == 3
    assert sorted(result.output.splitlines()) == [b"err", b"out"]


def test_env_and_cwd(client: Hypeman, guest: str) -> None:
    result = exec(
        client,
        guest,
        ["/bin/sh", "-c", 'echo "$GREETING"; pwd'],
        env={"GREETING": "hi"},
        cwd="/tmp",
    )
    assert (result.output, result.exit_code) == (b"hi\n/tmp\n", 0)


def test_stdin(client: Hypeman, guest: str) -> None:
    result = exec(client, guest, ["/bin/sh", "-c", "head -c 11"], stdin=b"hello guest and more")
    assert (result.output, result.exit_code) == (b"hello guest", 0)


def test_timeout_kills_the_command(client: Hypeman, guest: str) -> None:
    result = exec(client, guest, ["/bin/sh", "-c", "sleep 60 & sleep 60"], timeout=1)
    assert result.exit_code == -1  # hypeman's observable value (docs/api.md)
    assert not _running(client, guest, b"sleep\x0060\x00")  # the whole group is gone


def test_missing_program_and_bad_cwd_are_127(client: Hypeman, guest: str) -> None:
    missing = exec(client, guest, ["/no/such/program"])
    assert missing.exit_code == 127 and missing.output.startswith(b"Error: ")
    bad_cwd = exec(client, guest, ["/bin/true"], cwd="/no/such/dir")
    assert bad_cwd.exit_code == 127 and b"/no/such/dir" in bad_cwd.output


def test_tty_size_and_resize(client: Hypeman, guest: str) -> None:
    sized = exec(client, guest, ["/bin/stty", "size"], tty=True, rows=33, cols=101)
    assert (sized.output.strip(), sized.exit_code) == (b"33 101", 0)
    resized = exec(
        client,
        guest,
        ["/bin/sh", "-c", "sleep 2; stty size"],
        tty=True,
        rows=24,
        cols=80,
        resize=[(40, 120)],
    )
    assert resized.output.strip().endswith(b"40 120")


@pytest.mark.anyio
async def test_concurrent_sessions_on_one_instance(fleet: Fleet, guest: str) -> None:
    outputs: dict[int, bytes] = {}
    async with AsyncHypeman(
        api_key=fleet.api.token, base_url=fleet.api.base_url, max_retries=0
    ) as client:

        async def one(i: int) -> None:
            outputs[i] = (await exec_async(client, guest, ["/bin/echo", str(i)])).output

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
    assert outputs == {i: f"{i}\n".encode() for i in range(12)}


def test_bad_first_frames_and_resize_without_tty(fleet: Fleet, guest: str) -> None:
    headers = fleet.api.headers
    for first in (b"\x00binary first", "{not json"):
        with connect(_ws_url(fleet, guest), additional_headers=headers) as ws:
            ws.send(first)
            assert set(json.loads(ws.recv())) == {"error"}
    with connect(_ws_url(fleet, guest), additional_headers=headers) as ws:
        ws.send(json.dumps({"command": ["/bin/sh", "-c", "sleep 1; echo done"], "tty": False}))
        ws.send(json.dumps({"resize": {"rows": 10, "cols": 10}}))
        frames = list(ws)
    assert frames[-1] == '{"exitCode":0}' and b"done\n" in b"".join(
        f for f in frames if isinstance(f, bytes)
    )
    with connect(_ws_url(fleet, guest), additional_headers=headers) as ws:  # empty argv
        ws.send(json.dumps({"command": [], "tty": False}))
        ws.send(b"echo from-the-default-shell\n")
        ws.send('{"eof":true}')
        frames = list(ws)
    assert frames[-1] == '{"exitCode":0}' and b"from-the-default-shell" in frames[0]


# -- refusals before the upgrade -----------------------------------------------------------


def _refused(
    fleet: Fleet, instance: str, token: str | None, endpoint: str = "exec"
) -> tuple[int, object]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with (
        pytest.raises(InvalidStatus) as refused,
        connect(_ws_url(fleet, instance, endpoint), additional_headers=headers),
    ):
        pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"null")


def test_401_403_404_before_the_upgrade(fleet: Fleet, guest: str) -> None:
    from cli.token import mint_token

    status, body = _refused(fleet, guest, None)
    assert status == 401 and body["code"] == "Unauthorized"  # type: ignore[index]
    read_write = mint_token(SECRET, subject="ci", scopes=["read", "write"])
    assert _refused(fleet, guest, read_write, "cp") == (
        403,
        {"code": "forbidden", "message": "this token lacks the 'exec' scope"},
    )
    assert _refused(fleet, "no-such-instance", fleet.api.token) == (
        404,
        {"code": "not_found", "message": "resource not found"},
    )


# -- cp --------------------------------------------------------------------------------------


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret").write_bytes(secrets.token_bytes(100_000))
    (root / "secret").chmod(0o600)
    (root / "sub" / "big.bin").write_bytes(secrets.token_bytes(3 * 1024 * 1024 + 7))
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / "sub").chmod(0o750)


def _listing(root: Path) -> dict[str, tuple[str, int, bytes]]:
    found: dict[str, tuple[str, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            found[rel] = ("link", 0, os.readlink(path).encode())
        elif stat.S_ISDIR(info.st_mode):
            found[rel] = ("dir", stat.S_IMODE(info.st_mode), b"")
        else:
            found[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def test_cp_a_tree_in_and_out(client: Hypeman, guest: str, tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    _tree(source)
    old_umask = os.umask(0)
    try:
        cp_to_instance(client, guest, source, "/tmp/tree")
    finally:
        os.umask(old_umask)
    listed = exec(client, guest, ["/bin/sh", "-c", "cd /tmp/tree && ln -s run.sh link && ls"])
    assert listed.exit_code == 0, listed.output
    cp_from_instance(client, guest, "/tmp/tree", tmp_path / "back")
    back = _listing(tmp_path / "back" / "tree")
    expected = _listing(source)
    expected["link"] = ("link", 0, b"run.sh")
    assert {k: v[::2] for k, v in back.items()} == {k: v[::2] for k, v in expected.items()}
    assert {k: v[1] for k, v in back.items() if v[0] == "file"} == {
        k: v[1] for k, v in expected.items() if v[0] == "file"
    }


def test_cp_errors_are_the_sdks(client: Hypeman, guest: str, tmp_path: Path) -> None:
    with pytest.raises(CopyProtocolError):
        cp_from_instance(client, guest, "/no/such/path", tmp_path / "out")
    exec(client, guest, ["/bin/sh", "-c", "echo x > /tmp/a-file"])
    local = tmp_path / "f.txt"
    local.write_bytes(b"data")
    with pytest.raises(CopyProtocolError):
        cp_to_instance(client, guest, local, "/tmp/a-file/below")


# -- stat ------------------------------------------------------------------------------------


def test_stat(client: Hypeman, guest: str) -> None:
    exec(
        client, guest, ["/bin/sh", "-c", "printf 12345 > /tmp/s.txt; ln -sf /tmp/s.txt /tmp/s.lnk"]
    )
    file = client.instances.stat(guest, path="/tmp/s.txt")
    assert (file.exists, file.is_file, file.is_dir, file.size) == (True, True, False, 5)
    directory = client.instances.stat(guest, path="/tmp")
    assert (directory.exists, directory.is_dir) == (True, True)
    link = client.instances.stat(guest, path="/tmp/s.lnk")
    assert (link.is_symlink, link.link_target) == (True, "/tmp/s.txt")
    followed = client.instances.stat(guest, path="/tmp/s.lnk", follow_links=True)
    assert (followed.is_symlink, followed.is_file, followed.size) == (False, True, 5)
    missing = client.instances.stat(guest, path="/nope")
    assert (missing.exists, missing.error) == (False, None)


# -- backpressure ----------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_holds_the_guest_back(fleet: Fleet, guest: str) -> None:
    assert fleet.worker.proc is not None
    worker_pid = fleet.worker.proc.pid
    with connect(_ws_url(fleet, guest), additional_headers=fleet.api.headers) as ws:
        ws.send(json.dumps({"command": ["/bin/sh", "-c", "cat /dev/urandom"], "tty": False}))
        ws.recv()
        time.sleep(8)  # not reading: every buffer on the way fills, then the guest waits
        worker_before = _rss_mib(worker_pid)
        gateway_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        time.sleep(8)
        assert _rss_mib(worker_pid) < worker_before + 32
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 < gateway_before + 32
    client = Hypeman(api_key=fleet.api.token, base_url=fleet.api.base_url, max_retries=0)
    deadline = time.monotonic() + 30
    while _running(client, guest, b"cat\x00/dev/urandom\x00"):
        assert time.monotonic() < deadline, "the command outlived its session"
        time.sleep(0.5)


# -- bad input and faults ----------------------------------------------------------------------


def test_a_huge_env_is_refused_or_run_never_a_hang(client: Hypeman, guest: str) -> None:
    value = "v" * (64 << 10)
    too_big = exec(client, guest, ["/bin/true"], env={f"V{i}": value for i in range(16)})
    assert too_big.exit_code == 127 and b"larger than 512 KiB" in too_big.output
    # Under the request limit but over the kernel's 128 KiB per string: execve's error.
    one_long = exec(client, guest, ["/bin/true"], env={"LONG": "x" * (200 << 10)})
    assert one_long.exit_code == 127 and one_long.output.startswith(b"Error: ")
    print_lengths = ["/bin/sh", "-c", 'echo "${#V0} ${#V5}"']
    fits = exec(client, guest, print_lengths, env={f"V{i}": value for i in range(6)})
    assert (fits.output, fits.exit_code) == (b"65536 65536\n", 0)


def test_cp_from_a_symlink_loop_ends(client: Hypeman, guest: str, tmp_path: Path) -> None:
    made = exec(
        client,
        guest,
        ["/bin/sh", "-c", "mkdir -p /tmp/loop/d && cd /tmp/loop && echo hi > d/f && "
         "ln -s . d/self && ln -s .. d/up && ln -s ../loop up2"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    cp_from_instance(client, guest, "/tmp/loop", tmp_path / "followed", follow_symlinks=True)
    followed = tmp_path / "followed" / "loop"
    assert (followed / "d" / "f").read_bytes() == b"hi\n"
    # A directory reached through a followed link is not descended into.
    assert sorted(p.name for p in (followed / "d" / "self").iterdir()) == []
    cp_from_instance(client, guest, "/tmp/loop", tmp_path / "kept")
    assert os.readlink(tmp_path / "kept" / "loop" / "d" / "self") == "."


def test_cp_of_a_file_that_grows_while_copied(
    fleet: Fleet, client: Hypeman, guest: str, tmp_path: Path
) -> None:
    grow = (
        "head -c 4194304 /dev/zero > /tmp/grow; "
        "while :; do head -c 65536 /dev/zero; done >> /tmp/grow"
    )
    with connect(_ws_url(fleet, guest), additional_headers=fleet.api.headers) as writer:
        writer.send(json.dumps({"command": ["/bin/sh", "-c", grow], "tty": False}))
        while (client.instances.stat(guest, path="/tmp/grow").size or 0) < 4 << 20:
            time.sleep(0.2)
        for attempt in range(3):
            local = tmp_path / f"grow-{attempt}"
            try:
                cp_from_instance(client, guest, "/tmp/grow", local)
            except CopyProtocolError:
                continue  # the SDK's size check refused it: no file claimed as copied
            data = (local / "grow").read_bytes()
            assert len(data) >= 4 << 20 and data.count(0) == len(data)
    assert not _running(client, guest, b"head\x00-c\x0065536")  # the writer ended with it


def test_many_small_files_in_and_out(client: Hypeman, guest: str, tmp_path: Path) -> None:
    count = int(os.environ.get("VMFLEET_TEST_CP_FILES", "2000"))
    source = tmp_path / "many"
    source.mkdir()
    for i in range(count):
        (source / f"f{i:05d}").write_bytes(f"file {i}\n".encode())
    started = time.monotonic()
    cp_to_instance(client, guest, source, "/tmp/many")
    uploaded = time.monotonic()
    cp_from_instance(client, guest, "/tmp/many", tmp_path / "back")
    downloaded = time.monotonic()
    print(
        f"{count} files: in {uploaded - started:.1f} s, out {downloaded - uploaded:.1f} s"
    )  # the figures the docs quote
    assert _listing(tmp_path / "back" / "many") == _listing(source)
    assert exec(client, guest, ["/bin/rm", "-rf", "/tmp/many"]).exit_code == 0


class _RssSampler:
    """The peak RSS of some processes, sampled in a thread while a transfer runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.start = {name: _rss_mib(pid) for name, pid in pids.items()}
        self.peak = dict(self.start)
        self._pids = pids
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            for name, pid in self._pids.items():
                self.peak[name] = max(self.peak[name], _rss_mib(pid))

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def growth(self) -> dict[str, float]:
        return {name: round(self.peak[name] - self.start[name], 1) for name in self.start}


def test_a_64_mib_copy_in_and_out_with_bounded_memory(
    fleet: Fleet, client: Hypeman, guest: str, tmp_path: Path
) -> None:
    assert fleet.worker.proc is not None
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(64):
            f.write(secrets.token_bytes(1 << 20))
    pids = {"gateway and client": os.getpid(), "worker": fleet.worker.proc.pid}
    with _RssSampler(pids) as rss:
        cp_to_instance(client, guest, big, "/tmp/big.bin")
        cp_from_instance(client, guest, "/tmp/big.bin", tmp_path / "back")
    print(f"RSS growth during a 64 MiB copy in and out (MiB): {rss.growth()}")
    assert all(growth < 64 for growth in rss.growth().values()), rss.growth()
    assert _sha256(tmp_path / "back" / "big.bin") == _sha256(big)
    assert exec(client, guest, ["/bin/rm", "/tmp/big.bin"]).exit_code == 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_flooding_guest_and_a_slow_client(fleet: Fleet, client: Hypeman, guest: str) -> None:
    assert fleet.worker.proc is not None
    pids = {"gateway and client": os.getpid(), "worker": fleet.worker.proc.pid}
    with (
        connect(_ws_url(fleet, guest), additional_headers=fleet.api.headers) as ws,
        _RssSampler(pids) as rss,
    ):
        ws.send(json.dumps({"command": ["/bin/sh", "-c", "yes | head -c 209715200"], "tty": False}))
        received = 0
        for _ in range(400):  # a client reading 32 KiB frames at a walking pace
            frame = ws.recv()
            assert isinstance(frame, bytes), frame  # the flood is still going
            received += len(frame)
            time.sleep(0.02)
    print(f"RSS growth under a flood read slowly (MiB): {rss.growth()}")
    assert all(growth < 64 for growth in rss.growth().values()), rss.growth()
    assert received >= 400
    deadline = time.monotonic() + 30
    while _running(client, guest, b"yes\x00") or _running(
        client, guest, b"head\x00-c\x00209715200"
    ):
        assert time.monotonic() < deadline, "the flood outlived its session"
        time.sleep(0.5)


def _ops_log(fleet: Fleet, instance: str) -> str:
    with httpx.Client(base_url=fleet.api.base_url, headers=fleet.api.headers) as http:
        answer = http.get(f"/instances/{instance}/logs", params={"source": "hypeman", "tail": 50})
        answer.raise_for_status()
        return answer.text


def test_the_agent_killed_through_exec_comes_back(
    fleet: Fleet, client: Hypeman, guest: str
) -> None:
    killed = exec(client, guest, ["/bin/sh", "-c", "echo bye; kill -9 $PPID; sleep 600"])
    assert killed.exit_code == 127 and b"Error: " in killed.output  # the session failed
    # The init starts the agent again after 1 s: an exec in that gap is told the agent is
    # not available; on a slow machine this one may already find the new agent.
    after = exec(client, guest, ["/bin/echo", "hello"])
    if after.exit_code != 0:
        assert after.exit_code == 127 and b"agent" in after.output, after
        assert b"not available" in after.output, after
    assert client.instances.get(guest).state == "Running"  # the VM and the app are fine
    deadline = time.monotonic() + 120
    while (again := exec(client, guest, ["/bin/echo", "hello"])).exit_code != 0:
        assert time.monotonic() < deadline, "the agent never came back"
        time.sleep(1)
    assert again.output == b"hello\n"
    ops_log = _ops_log(fleet, guest)  # the instance says what happened, in order
    lost = ops_log.index("WARN guest agent not available: the agent exited in the guest")
    assert "INFO guest agent ready" in ops_log[lost:]
    assert not _running(client, guest, b"sleep\x00600\x00")  # the killed session's command


# -- a second guest: state changes ------------------------------------------------------------


def test_exec_into_stopped_or_standby_is_refused(
    fleet: Fleet, client: Hypeman, busybox_image: str
) -> None:
    other = client.instances.create(
        name="exec-state-" + secrets.token_hex(3),
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["/bin/sh", "-c", "sleep 100000"],
    )
    try:
        with connect(_ws_url(fleet, other.id), additional_headers=fleet.api.headers) as ws:
            ws.send(json.dumps({"command": ["/bin/sleep", "600"], "tty": False}))
            time.sleep(1)
            client.instances.standby(other.id)
            frames = list(ws)  # the session ends as hypeman ends a failed one
        assert frames[-1] == '{"exitCode":127}' and frames[0].startswith(b"Error: ")
        assert _refused(fleet, other.id, fleet.api.token) == (
            409,
            {
                "code": "invalid_state",
                "message": "instance must be running (current state: Standby)",
            },
        )
        with httpx.Client(base_url=fleet.api.base_url, headers=fleet.api.headers) as http:
            refused = http.get(f"/instances/{other.id}/stat", params={"path": "/"})
            assert refused.status_code == 409
        client.instances.restore(other.id)
        assert exec(client, other.id, ["/bin/echo", "back"]).output == b"back\n"
        client.instances.stop(other.id)
        status, body = _refused(fleet, other.id, fleet.api.token, "cp")
        assert (status, body["code"]) == (409, "invalid_state")  # type: ignore[index]
    finally:
        client.instances.delete(other.id)


# -- last: the worker dies mid-session -------------------------------------------------------


def test_worker_killed_mid_session(fleet: Fleet, client: Hypeman, guest: str) -> None:
    with connect(_ws_url(fleet, guest), additional_headers=fleet.api.headers) as ws:
        ws.send(json.dumps({"command": ["/bin/sh", "-c", "echo started; sleep 600"], "tty": False}))
        assert ws.recv() == b"started\n"
        fleet.worker.kill()
        frames = list(ws)  # the gateway notices the silence and ends the session
    assert frames[-1] == '{"exitCode":127}' and b"stopped answering" in frames[0]
    fleet.worker.start()
    deadline = time.monotonic() + 180
    while True:
        try:
            result = exec(client, guest, _PROCESSES)
            if result.exit_code == 0:
                break
        except (InvalidStatus, ExecProtocolError):
            pass
        assert time.monotonic() < deadline, "the restarted worker never served exec again"
        time.sleep(1)
    assert b"sleep\x00600\x00" not in result.output  # the agent killed the orphaned command


# -- the CLI ---------------------------------------------------------------------------------


def _cli_env(fleet: Fleet) -> dict[str, str]:
    return {
        **os.environ,
        "HYPEMAN_BASE_URL": fleet.api.base_url,
        "HYPEMAN_API_KEY": fleet.api.token,
    }


def _read_until(fd: int, wanted: bytes, seen: bytearray, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while wanted not in seen:
        assert time.monotonic() < deadline, f"never saw {wanted!r} in {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            seen += os.read(fd, 4096)


def test_cli_exec_with_a_real_tty_and_resize(fleet: Fleet, guest: str) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    script = "stty size; read line; stty size; exit 6"
    proc = subprocess.Popen(
        [VMFLEET, "exec", "-it", guest, "--", "/bin/sh", "-c", script],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=_cli_env(fleet),
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"30 100", seen)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        time.sleep(1)  # the resize frame goes out before the line that lets the script go on
        os.write(master, b"go\r")
        _read_until(master, b"40 120", seen)
        assert proc.wait(timeout=60) == 6  # the command's exit status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_cli_stdin_exit_status_and_cp_tar_streams(fleet: Fleet, guest: str, tmp_path: Path) -> None:
    env = _cli_env(fleet)
    piped = subprocess.run(
        [VMFLEET, "exec", "-i", guest, "--", "/bin/sh", "-c", "wc -c; exit 5"],
        input=b"x" * 100_000,
        env=env,
        capture_output=True,
        check=False,
    )
    assert (piped.returncode, piped.stdout.strip()) == (5, b"100000")
    source = tmp_path / "tree"
    source.mkdir()
    _tree(source)
    pushed = subprocess.run(
        [VMFLEET, "cp", str(source), f"{guest}:/tmp/cli-tree"], env=env, capture_output=True
    )
    assert pushed.returncode == 0, pushed.stderr
    pulled = subprocess.run(
        [VMFLEET, "cp", f"{guest}:/tmp/cli-tree", "-"], env=env, capture_output=True
    )
    assert pulled.returncode == 0, pulled.stderr
    (tmp_path / "out").mkdir()
    with tarfile.open(fileobj=io.BytesIO(pulled.stdout)) as tar:
        tar.extractall(tmp_path / "out", filter="tar")
    assert _listing(tmp_path / "out" / "cli-tree") == _listing(source)
