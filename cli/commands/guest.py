"""``exec``, ``cp`` and ``stat``: inside a running instance, through the gateway.

exec and cp speak hypeman's WebSocket protocols (docs/api.md) with the ``websockets``
client; exec adds vmfleet's end-of-input frame (``{"eof":true}``) so that a command
reading its stdin sees it end, as under ``docker exec -i``.

cp takes docker's ``SRC DEST``: exactly one side is ``NAME:/path``; the other is a local
path, or ``-`` for a tar stream (stdin for an upload, stdout for a download). A download
is received as a tar first (the gateway's frames map one to one onto tar members), then
extracted with tarfile's ``data`` filter, which refuses members escaping the destination.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import IO, Any, Final
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from cli.client import EXIT_REFUSED, EXIT_UNREACHABLE, GatewayClient, GatewayError, segment
from cli.commands._common import add_json_flag, client_command, key_value

__all__ = ["parse_cp_operand", "register"]

CHUNK: Final = 32 * 1024
MAX_MESSAGE: Final = 2**20
#: Exit status when the session broke before the command's exit code arrived.
EXIT_SESSION_LOST: Final = 255


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "exec",
        help="run a command in a running instance",
        description="Run CMD in the instance; its output is printed as it comes, and the "
        "exit status is the command's.",
    )
    ex.add_argument("-i", "--interactive", action="store_true", help="send stdin to CMD")
    ex.add_argument("-t", "--tty", action="store_true", help="give CMD a terminal")
    ex.add_argument(
        "-e",
        "--env",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable for CMD",
    )
    ex.add_argument("-w", "--workdir", help="working directory of CMD in the guest")
    ex.add_argument("--timeout", type=int, help="kill CMD after this many seconds")
    ex.add_argument("instance", help="instance id, name or unique id prefix")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    client_command(ex, _exec)

    cp = sub.add_parser(
        "cp",
        help="copy files into or out of a running instance",
        description="Copy SRC to DEST; one of them is NAME:/path in a guest, the other a "
        "local path, or - for a tar stream on stdin (upload) or stdout (download).",
    )
    cp.add_argument("src", help="NAME:/path, a local path, or -")
    cp.add_argument("dest", help="NAME:/path, a local path, or -")
    client_command(cp, _cp)

    st = sub.add_parser("stat", help="describe a path in a running instance")
    st.add_argument("instance", help="instance id, name or unique id prefix")
    st.add_argument("path", help="absolute path in the guest")
    st.add_argument("-L", "--follow-links", action="store_true", help="follow a symlink")
    add_json_flag(st)
    client_command(st, _stat)


# -- the WebSocket ---------------------------------------------------------------------------


def _url(client: GatewayClient, instance: str, endpoint: str) -> str:
    parts = urlsplit(client.config.base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = f"{parts.path.rstrip('/')}/instances/{segment(instance)}/{endpoint}"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@contextlib.contextmanager
def _session(client: GatewayClient, instance: str, endpoint: str) -> Iterator[ClientConnection]:
    """A connected WebSocket; a refusal becomes the gateway's ``{code, message}``."""
    url = _url(client, instance, endpoint)
    headers = {"Authorization": f"Bearer {client.config.api_key}"}
    try:
        ws = connect(url, additional_headers=headers, max_size=MAX_MESSAGE, compression=None)
    except InvalidStatus as exc:
        raise _refusal(exc) from None
    except (OSError, WebSocketException) as exc:
        raise GatewayError.unreachable(client.config.base_url, exc) from None
    with ws:
        yield ws


def _refusal(exc: InvalidStatus) -> GatewayError:
    response = exc.response
    code, message = str(response.status_code), response.reason_phrase
    with contextlib.suppress(ValueError):
        body = json.loads(response.body or b"")
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            code, message = body["code"], str(body.get("message", ""))
    auth = response.status_code in (401, 403)
    exit_code = EXIT_UNREACHABLE if auth else EXIT_REFUSED
    return GatewayError(code, message, status=response.status_code, exit_code=exit_code)


# -- exec ------------------------------------------------------------------------------------


def _exec(client: GatewayClient, args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise GatewayError("bad_request", "no command given: vmfleet exec NAME -- CMD [ARG...]")
    request: dict[str, Any] = {"command": command, "tty": args.tty}
    if args.env:
        request["env"] = dict(args.env)
    if args.workdir:
        request["cwd"] = args.workdir
    if args.timeout is not None:
        request["timeout"] = args.timeout
    terminal = args.tty and sys.stdin.isatty()
    if args.tty:
        rows, cols = _terminal_size()
        request["rows"], request["cols"] = rows, cols
    with _session(client, args.instance, "exec") as ws:
        ws.send(json.dumps(request, separators=(",", ":")))
        if args.interactive:
            threading.Thread(target=_pump_stdin, args=(ws,), daemon=True).start()
        else:
            ws.send('{"eof":true}')  # like docker exec without -i: stdin is empty
        with _raw_terminal(terminal), _resizes(ws, args.tty):
            return _print_output(ws)


def _pump_stdin(ws: ClientConnection) -> None:
    """stdin to the command, then the end-of-input frame (a thread: reads block)."""
    fd = sys.stdin.fileno()
    with contextlib.suppress(ConnectionClosed, OSError):
        while chunk := os.read(fd, CHUNK):
            ws.send(chunk)
        ws.send('{"eof":true}')


def _print_output(ws: ClientConnection) -> int:
    out = sys.stdout.buffer
    try:
        for frame in ws:
            if isinstance(frame, bytes):
                out.write(frame)
                out.flush()
                continue
            return _exit_status(frame)
    except ConnectionClosed:
        pass
    print(
        "vmfleet: session_lost: the session ended before the command's exit code", file=sys.stderr
    )
    return EXIT_SESSION_LOST


def _exit_status(frame: str) -> int:
    try:
        control = json.loads(frame)
    except ValueError:
        control = None
    if isinstance(control, dict) and isinstance(control.get("exitCode"), int):
        code = int(control["exitCode"])
        return code if 0 <= code <= 255 else EXIT_SESSION_LOST
    message = control.get("error") if isinstance(control, dict) else frame
    print(f"vmfleet: exec_failed: {message}", file=sys.stderr)
    return EXIT_SESSION_LOST


def _terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """The local terminal in raw mode while a TTY session runs (keys go to the guest)."""
    if not enabled:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _resizes(ws: ClientConnection, enabled: bool) -> Iterator[None]:
    """Forward window size changes (SIGWINCH) to the guest's terminal."""
    if not enabled:
        yield
        return

    def on_resize(signum: int, frame: FrameType | None) -> None:
        rows, cols = _terminal_size()
        with contextlib.suppress(ConnectionClosed, OSError):
            ws.send(json.dumps({"resize": {"rows": rows, "cols": cols}}))

    previous = signal.signal(signal.SIGWINCH, on_resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


# -- cp --------------------------------------------------------------------------------------


def parse_cp_operand(text: str) -> tuple[str | None, str]:
    """``NAME:/path`` → (NAME, /path); anything else (``-``, ``./x``, ``/x``) is local."""
    name, sep, path = text.partition(":")
    if sep and name and "/" not in name and path.startswith("/"):
        return name, path
    return None, text


def _cp(client: GatewayClient, args: argparse.Namespace) -> int:
    src_instance, src = parse_cp_operand(args.src)
    dest_instance, dest = parse_cp_operand(args.dest)
    if (src_instance is None) == (dest_instance is None):
        raise GatewayError(
            "bad_request", "exactly one of SRC and DEST must be NAME:/path in an instance"
        )
    if dest_instance is not None:
        _upload(client, dest_instance, src, dest)
    else:
        assert src_instance is not None
        _download(client, src_instance, src, dest)
    return 0


def _upload(client: GatewayClient, instance: str, src: str, dest: str) -> None:
    if src == "-":
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as tar:
            for member in tar:
                _upload_member(client, instance, tar, member, dest)
        return
    root = Path(src)
    if not root.exists():
        raise GatewayError("not_found", f"{src}: no such file or directory")
    for local, remote in _walk(root, dest):
        info = local.stat()
        if stat.S_ISDIR(info.st_mode):
            _send_entry(client, instance, remote, True, stat.S_IMODE(info.st_mode), None)
        else:
            with local.open("rb") as data:
                _send_entry(client, instance, remote, False, stat.S_IMODE(info.st_mode), data)


def _walk(root: Path, dest: str) -> Iterator[tuple[Path, str]]:
    """Pre-order, children by name; symlinks followed, directory loops skipped (as the SDK)."""
    seen: set[tuple[int, int]] = set()

    def visit(path: Path, remote: str) -> Iterator[tuple[Path, str]]:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                return
            seen.add((info.st_dev, info.st_ino))
        yield path, remote
        if stat.S_ISDIR(info.st_mode):
            for child in sorted(path.iterdir(), key=lambda p: p.name):
                yield from visit(child, str(PurePosixPath(remote) / child.name))

    yield from visit(root, dest)


def _upload_member(
    client: GatewayClient,
    instance: str,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    dest: str,
) -> None:
    relative = PurePosixPath(member.name)
    if relative.is_absolute() or ".." in relative.parts:
        raise GatewayError("bad_request", f"tar member {member.name!r} leaves the destination")
    remote = str(PurePosixPath(dest) / relative) if str(relative) != "." else dest
    if member.isdir():
        _send_entry(client, instance, remote, True, member.mode & 0o7777, None)
    elif member.isfile():
        _send_entry(client, instance, remote, False, member.mode & 0o7777, tar.extractfile(member))
    else:
        print(
            f"vmfleet: skipping {member.name}: only files and directories can be copied in",
            file=sys.stderr,
        )


def _send_entry(
    client: GatewayClient,
    instance: str,
    remote: str,
    is_dir: bool,
    mode: int,
    data: IO[bytes] | None,
) -> None:
    """One entry, one WebSocket (hypeman's cp-to protocol)."""
    request = {"direction": "to", "guest_path": remote, "is_dir": is_dir, "mode": mode}
    with _session(client, instance, "cp") as ws:
        ws.send(json.dumps(request, separators=(",", ":")))
        sent = 0
        while data is not None and (chunk := data.read(CHUNK)):
            ws.send(chunk)
            sent += len(chunk)
        ws.send('{"type":"end"}')
        result = _control(ws, remote)
    if result.get("type") != "result" or result.get("success") is not True:
        raise GatewayError("copy_failed", f"{remote}: {result.get('error') or result}")
    if int(result.get("bytes_written") or 0) != sent:
        raise GatewayError("copy_failed", f"{remote}: the guest wrote a different size")


def _control(ws: ClientConnection, path: str) -> dict[str, Any]:
    try:
        frame = ws.recv()
    except ConnectionClosed:
        raise GatewayError("copy_failed", f"{path}: the session ended early") from None
    if isinstance(frame, bytes):
        raise GatewayError("copy_failed", f"{path}: unexpected data from the guest")
    message = json.loads(frame)
    if not isinstance(message, dict):
        raise GatewayError("copy_failed", f"{path}: unexpected answer {frame!r}")
    if message.get("type") == "error":
        where, said = message.get("path") or path, str(message.get("message"))
        # The agent's message often names the path already (Go's "open X: ..." errors).
        raise GatewayError(
            "copy_failed", said if said.startswith(f"{where}:") else f"{where}: {said}"
        )
    return message


def _download(client: GatewayClient, instance: str, src: str, dest: str) -> None:
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w") as tar:
            _receive_tar(client, instance, src, tar)
        spool.seek(0)
        if dest == "-":
            shutil.copyfileobj(spool, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        target = Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=spool, mode="r") as tar:
            tar.extractall(target, filter="tar")


def _receive_tar(client: GatewayClient, instance: str, src: str, tar: tarfile.TarFile) -> None:
    """The guest's header/data/end frames as tar members."""
    request = {"direction": "from", "guest_path": src, "follow_links": False}
    with _session(client, instance, "cp") as ws:
        ws.send(json.dumps(request, separators=(",", ":")))
        while True:
            header = _control(ws, src)
            if header.get("type") != "header":
                raise GatewayError("copy_failed", f"{src}: unexpected frame {header}")
            info = _tar_info(header)
            if info.isfile():
                with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
                    _file_data(ws, src, info, spool)
                    tar.addfile(info, spool)
            else:
                tar.addfile(info)
            end = _control(ws, src)
            if end.get("type") != "end":
                raise GatewayError("copy_failed", f"{src}: expected the end of {info.name}")
            if end.get("final") is True:
                return


def _tar_info(header: dict[str, Any]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(str(header["path"]))
    info.mode = int(header.get("mode", 0)) & 0o7777
    info.mtime = int(header.get("mtime", 0))
    info.uid, info.gid = int(header.get("uid", 0)), int(header.get("gid", 0))
    if header.get("is_symlink"):
        info.type, info.linkname = tarfile.SYMTYPE, str(header.get("link_target", ""))
    elif header.get("is_dir"):
        info.type = tarfile.DIRTYPE
    else:
        info.size = int(header.get("size", 0))
    return info


def _file_data(ws: ClientConnection, src: str, info: tarfile.TarInfo, spool: IO[bytes]) -> None:
    """A file's BINARY frames into ``spool`` (a file may be larger than memory)."""
    received = 0
    while received < info.size:
        try:
            frame = ws.recv()
        except ConnectionClosed:
            raise GatewayError("copy_failed", f"{src}: the session ended early") from None
        if not isinstance(frame, bytes):
            raise GatewayError("copy_failed", f"{info.name}: {frame}")
        spool.write(frame)
        received += len(frame)
    if received != info.size:
        raise GatewayError("copy_failed", f"{info.name}: size changed while copied")
    spool.seek(0)


# -- stat ------------------------------------------------------------------------------------


def _stat(client: GatewayClient, args: argparse.Namespace) -> int:
    params = {"path": args.path, "follow_links": "true" if args.follow_links else "false"}
    response = client.request(
        "GET", f"/instances/{segment(args.instance)}/stat", params=params, what="instance"
    )
    info = response.json()
    if args.json:
        print(json.dumps(info))
    elif not info.get("exists"):
        reason = info.get("error") or "no such file or directory"
        print(f"{args.path}: {reason}", file=sys.stderr)
        return 1
    else:
        kind = (
            "symlink"
            if info.get("is_symlink")
            else "directory"
            if info.get("is_dir")
            else "file"
            if info.get("is_file")
            else "other"
        )
        print(f"path:  {args.path}")
        print(f"type:  {kind}" + (f" -> {info['link_target']}" if info.get("is_symlink") else ""))
        print(f"mode:  {int(info.get('mode', 0)):04o}")
        print(f"size:  {info.get('size', 0)}")
    return 0
