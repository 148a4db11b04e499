"""The agent in a real guest, through the worker's hub: exec, cp and stat as the relay
carries them (hypeman's frames, unchanged). One guest serves the whole module."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from tests.worker.agent.conftest import Guest, Output, collect
from worker.agent import Frame

pytestmark = pytest.mark.vm


def test_output_and_exit_code_with_stderr_merged(guest: Guest) -> None:
    out = guest.exec_sync(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert out.data == b"out\nerr\n"
    assert out.texts == [{"exitCode": 3}]


def test_commands_and_the_app_run_at_the_normal_priority(guest: Guest) -> None:
    """The init starts the agent at nice 10 so that the app's start comes first; once its
    channel is open the agent is back at 0, and so are the commands it runs. The app was
    never lowered (field 19 of /proc/PID/stat is the nice value)."""
    app = "for p in /proc/[0-9]*; do grep -q '^sleep' $p/cmdline && cut -d' ' -f19 $p/stat; done"
    out = guest.exec_sync(["sh", "-c", f"cut -d' ' -f19 /proc/self/stat; {app}"])
    # This command, then every sleep: the app (sleep 100000) and the init's own.
    assert len(out.data.split()) >= 2 and set(out.data.split()) == {b"0"}, out.data


def test_stdin_until_eof(guest: Guest) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: more than one frame and one window
    out = guest.run(guest.exec, {"command": ["sh", "-c", "cat | md5sum"]}, data)
    import hashlib

    assert out.data.split()[0].decode() == hashlib.md5(data).hexdigest()
    assert out.exit_code == 0


def test_env_is_merged_over_the_instance_env_and_cwd_is_used(guest: Guest) -> None:
    out = guest.exec_sync(
        ["sh", "-c", 'echo "$GREETING $HOME"; pwd'], env={"GREETING": "hi"}, cwd="/etc"
    )
    assert out.data == b"hi /root\n/etc\n"


def test_a_missing_program_or_cwd_is_exit_127_with_the_error(guest: Guest) -> None:
    missing = guest.exec_sync(["no-such-program"])
    assert missing.exit_code == 127
    assert missing.data.startswith(b"Error: ") and b"no-such-program" in missing.data
    bad_cwd = guest.exec_sync(["true"], cwd="/no/such/dir")
    assert bad_cwd.exit_code == 127 and b"/no/such/dir" in bad_cwd.data


def test_a_timeout_kills_the_whole_process_group(guest: Guest) -> None:
    out = guest.exec_sync(["sh", "-c", "sleep 7771 & sleep 7772; echo never"], timeout=1)
    assert out.exit_code == -1
    assert b"never" not in out.data
    assert not _processes(guest, "sleep 777")


def test_a_tty_session_has_its_size_and_follows_resizes(guest: Guest) -> None:
    async def scenario() -> Output:
        async with await guest.open("exec") as session:
            request = {"command": ["sh", "-c", "stty size; read line; stty size"], "tty": True}
            await session.send(Frame.json({**request, "rows": 30, "cols": 100}))
            # "30 100\r\n": busybox stty may write the newline on its own, so wait for it
            # before typing, or the terminal's echo of the typed line comes first.
            first = await session.receive()
            while b"\n" not in first.data:
                first = Frame(False, first.data + (await session.receive()).data)
            await session.send(Frame.json({"resize": {"rows": 40, "cols": 120}}))
            await session.send(Frame(False, b"go\n"))
            rest = await collect(session)
            return Output(first.data + rest.data, rest.texts)

    out = guest.run(scenario)
    assert out.data.replace(b"\r", b"").split(b"\n")[:3] == [b"30 100", b"go", b"40 120"]
    assert out.exit_code == 0


def test_two_sessions_at_once(guest: Guest) -> None:
    async def both() -> list[Output]:
        results: list[Output] = []

        async def one(text: str) -> None:
            results.append(await guest.exec({"command": ["sh", "-c", f"sleep 1; echo {text}"]}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first")
            tg.start_soon(one, "second")
        return results

    outputs = guest.run(both)
    assert sorted(o.data for o in outputs) == [b"first\n", b"second\n"]


def test_aborting_a_session_mid_output_leaves_no_process(guest: Guest) -> None:
    async def abort_early() -> None:
        session = await guest.open("exec")
        await session.send(Frame.json({"command": ["sh", "-c", "yes flood"], "tty": False}))
        for _ in range(5):
            assert not (await session.receive()).text
        await session.aclose()

    guest.run(abort_early)
    assert not _processes(guest, "yes flood")
    assert guest.exec_sync(["true"]).exit_code == 0  # the agent goes on


def test_stat_of_file_dir_symlink_and_missing(guest: Guest) -> None:
    guest.exec_sync(["sh", "-c", "printf abc > /tmp/f; chmod 640 /tmp/f; ln -sf /tmp/f /tmp/l"])
    assert _stat(guest, "/tmp/f") == {
        "exists": True, "is_dir": False, "is_file": True, "is_symlink": False,
        "link_target": "", "mode": 0o640, "size": 3, "error": None,
    }  # fmt: skip
    assert _stat(guest, "/tmp")["is_dir"] is True
    link = _stat(guest, "/tmp/l")
    assert (link["is_symlink"], link["link_target"], link["mode"], link["size"]) == (
        True, "/tmp/f", 0o777, len("/tmp/f"),
    )  # fmt: skip
    followed = _stat(guest, "/tmp/l", follow_links=True)
    assert (followed["is_symlink"], followed["is_file"], followed["size"]) == (False, True, 3)
    assert _stat(guest, "/nope") == {
        "exists": False, "is_dir": False, "is_file": False, "is_symlink": False,
        "link_target": "", "mode": 0, "size": 0, "error": None,
    }  # fmt: skip


def test_cp_a_tree_in_then_out(guest: Guest) -> None:
    # In: hypeman's upload, one session per entry, pre-order.
    assert _cp_to(guest, {"guest_path": "/data", "is_dir": True, "mode": 0o750}) == {
        "type": "result", "success": True,
    }  # fmt: skip
    a_txt = {"guest_path": "/data/a.txt", "is_dir": False, "mode": 0o600}
    assert _cp_to(guest, a_txt, b"hello") == {
        "type": "result", "success": True, "bytes_written": 5,
    }  # fmt: skip
    assert _cp_to(guest, {"guest_path": "/data/sub", "is_dir": True, "mode": 0o755})["success"]
    big = bytes(range(256)) * 600  # 150 KiB: several data frames
    result = _cp_to(guest, {"guest_path": "/data/sub/b.bin", "is_dir": False, "mode": 0o644}, big)
    assert result["bytes_written"] == len(big)
    guest.exec_sync(["ln", "-s", "a.txt", "/data/link"])
    # Out: one session, headers/data/ends as hypeman sends them.
    frames = _cp_from(guest, "/data")
    headers = [f for f in frames if isinstance(f, dict) and f.get("type") == "header"]
    assert [(h["path"], h["is_dir"], h["mode"]) for h in headers] == [
        ("data", True, 0o750),
        ("data/a.txt", False, 0o600),
        ("data/link", False, 0o777),
        ("data/sub", True, 0o755),
        ("data/sub/b.bin", False, 0o644),
    ]
    link = headers[2]
    assert (link["is_symlink"], link["link_target"], link["size"]) == (True, "a.txt", 5)
    ends = [f for f in frames if isinstance(f, dict) and f.get("type") == "end"]
    assert [e["final"] for e in ends] == [False] * 4 + [True]
    after_a = frames.index(headers[1]) + 1
    assert frames[after_a] == b"hello"
    data = b"".join(f for f in frames[frames.index(headers[4]) + 1 :] if isinstance(f, bytes))
    assert data == big


def test_cp_errors(guest: Guest) -> None:
    frames = _cp_from(guest, "/no/such/path")
    assert len(frames) == 1 and frames[0]["type"] == "error"  # type: ignore[index]
    guest.exec_sync(["sh", "-c", "echo x > /tmp/plainfile"])
    result = _cp_to(guest, {"guest_path": "/tmp/plainfile/x", "is_dir": False, "mode": 0}, b"y")
    assert result["success"] is False and "not a directory" in result["error"]


# -- helpers -----------------------------------------------------------------------------------


def _processes(guest: Guest, needle: str) -> list[str]:
    out = guest.exec_sync(["ps", "-o", "args"])
    return [line for line in out.data.decode().splitlines() if line.startswith(needle)]


def _stat(guest: Guest, path: str, *, follow_links: bool = False) -> dict[str, Any]:
    async def ask() -> Output:
        async with await guest.open("stat") as session:
            await session.send(Frame.json({"path": path, "follow_links": follow_links}))
            return await collect(session)

    (info,) = guest.run(ask).texts
    return info


def _cp_to(guest: Guest, entry: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
    async def upload() -> Output:
        async with await guest.open("cp") as session:
            await session.send(Frame.json({"direction": "to", **entry}))
            if data:
                await session.send(Frame(False, data))
            await session.send(Frame.json({"type": "end"}))
            return await collect(session)

    (result,) = guest.run(upload).texts
    return result


def _cp_from(guest: Guest, path: str) -> list[dict[str, Any] | bytes]:
    async def download() -> list[dict[str, Any] | bytes]:
        frames: list[dict[str, Any] | bytes] = []
        async with await guest.open("cp") as session:
            request = {"direction": "from", "guest_path": path, "follow_links": False}
            await session.send(Frame.json(request))
            try:
                while True:
                    frame = await session.receive()
                    frames.append(json.loads(frame.data) if frame.text else frame.data)
            except anyio.EndOfStream:
                return frames

    return guest.run(download)
