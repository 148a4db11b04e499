"""A test double of Cloud Hypervisor's REST API. It is NOT Cloud Hypervisor: no KVM, no
guest kernel; what looks like a guest is a few lines of Python.

Run as ``cloud-hypervisor --api-socket PATH`` (``tests/support/bin/cloud-hypervisor`` wraps
it), it serves CH's API (v0.3.0, ``../shared/specs/cloud-hypervisor-api.yaml``) on that unix
socket, one request per connection, and:

- checks every request against the spec before anything else: the path and method must be
  in it, a body must be there exactly when the spec has a ``requestBody`` (as JSON, valid
  against its schema, checked with jsonschema-rs), and, stricter than CH (whose serde skips
  unknown fields), an object may hold only the properties the spec lists, so a misspelt
  field is a 400 rather than silently ignored. Anything else is answered 4xx;
- keeps CH's VM state machine (no VM → Created → Running ⇄ Paused → Shutdown, restore
  only into a fresh VMM, coming up Paused), answering the spec's documented 404/405 where
  it documents them and 500 (as CH does) for other refusals;
- does what CH does that a driver depends on: it opens the ``File`` serial port with
  truncation at boot and restore; makes a real pty for a ``Pty`` console and reports its
  path in ``vm.info``; refuses a ``Socket`` console at boot as CH does; requires a PVH ELF
  kernel; writes ``config.json``, ``state.json`` and ``memory-ranges`` on ``vm.snapshot``
  (only when paused) and reads them back on ``vm.restore``; updates its device list on
  ``vm.add-disk``/``vm.remove-device`` (a removed device leaves ``device_tree`` once the
  "guest" ejects it, which a paused guest does not); answers ``vmm.shutdown`` with 200 and
  exits, removing its socket; exits when the guest powers off;
- imitates the guest just enough: at boot it appends lines marked as the double's to the
  serial file, then the init's markers (``[vmfleet] app started pid=1``), or, for
  ``vmfleet.probe=1``, the probe marker followed by a power-off; with
  ``vmfleet.ctl=hvc0`` on the kernel command line it answers vmfleet's control protocol on
  the console pty (ping, status, settime, mount/umount of disks it really has by serial,
  shutdown), and only while the VM runs;
- emulates CH's hybrid vsock: with a ``vsock`` device it listens on the device's unix
  socket, answers ``CONNECT <port>\n`` with ``OK <port>\n`` and then carries bytes both
  ways between that connection and the guest side, which is ``$CH_DOUBLE_VSOCK_FORWARD``
  (a unix socket the test listens on: a real guest agent run with ``-channel unix:PATH``)
  or else a pretend agent that answers the agent protocol's handshake and pings and
  refuses every session (docs/agent-protocol.md). A connection that cannot be carried
  is closed without an answer, as CH closes one nothing listens for in the guest.

Every request is appended as a JSON line to ``$CH_DOUBLE_LOG`` (if set) with the status it
got and why it was refused. Knobs (environment): ``CH_DOUBLE_FAIL`` (comma-separated
endpoints answered 500), ``CH_DOUBLE_NO_SOCKET=1`` (never listen), ``CH_DOUBLE_KVM=broken``
(the guest never prints anything), ``CH_DOUBLE_HANG=1`` (``vmm.shutdown`` is answered but
the process stays, and the guest ignores ``shutdown``), ``CH_DOUBLE_VERSION``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import tty
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml

from worker.agent.protocol import SYNC, FrameParser, Kind, encode
from worker.probe import PROBE_MARKER

SPEC = Path(__file__).resolve().parents[2] / ".." / "shared" / "specs" / "cloud-hypervisor-api.yaml"
PREFIX = "/api/v1/"
VIRTIO_MEM_ALIGN = 128 << 20

Json = Any


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- the spec ----------------------------------------------------------------------------------


def _strict(schema: Json) -> Json:
    """Every object schema that lists properties allows only those."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


class Spec:
    def __init__(self, path: Path) -> None:
        document = yaml.safe_load(path.read_text())
        self.paths: dict[str, dict[str, Json]] = document["paths"]
        self.components = _strict(document["components"])
        self._validators: dict[str, jsonschema_rs.Validator] = {}

    def validator(self, ref: str) -> jsonschema_rs.Validator:
        if ref not in self._validators:
            # Draft 4 ignores a $ref's siblings, so the document can ride along for it.
            schema = {"$ref": ref, "components": self.components}
            self._validators[ref] = jsonschema_rs.Draft4Validator(schema)
        return self._validators[ref]

    def check_request(self, method: str, endpoint: str, content_type: str, body: bytes) -> Json:
        """The request's JSON body (None if it has none), or Refused."""
        operation = self._operation(method, endpoint)
        request_body = operation.get("requestBody")
        if request_body is None:
            if body:
                raise Refused(400, f"{endpoint} takes no body")
            return None
        if not body:
            if request_body.get("required"):
                raise Refused(400, f"{endpoint} needs a body")
            return None
        media = request_body["content"]
        if content_type.split(";")[0].strip() not in media:
            raise Refused(415, f"{endpoint}: Content-Type {content_type!r} is not {list(media)}")
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise Refused(400, f"{endpoint}: not JSON: {exc}") from None
        ref = media["application/json"]["schema"]["$ref"]
        errors = [
            f"{'/'.join(map(str, e.instance_path)) or '(body)'}: {e.message}"
            for e in self.validator(ref).iter_errors(value)
        ]
        if errors:
            raise Refused(400, f"{endpoint} body does not match {ref}: " + "; ".join(errors))
        return value

    def check_response(self, method: str, endpoint: str, status: int, value: Json) -> None:
        """The double's own answers must match the spec too."""
        response = self._operation(method, endpoint)["responses"]
        documented = response.get(status) or response.get(str(status))
        schema = (documented or {}).get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            errors = [e.message for e in self.validator(schema["$ref"]).iter_errors(value)]
            if errors:
                raise AssertionError(f"the double answered {endpoint} off-spec: {errors}")

    def _operation(self, method: str, endpoint: str) -> dict[str, Json]:
        path = self.paths.get("/" + endpoint)
        if path is None:
            raise Refused(404, f"no endpoint /{endpoint} in the spec")
        operation = path.get(method.lower())
        if operation is None:
            raise Refused(405, f"/{endpoint} has no {method} in the spec")
        return operation


# -- the pretend guest -------------------------------------------------------------------------


class Guest:
    """What stands in for a guest: lines on the serial file, answers on the console pty."""

    def __init__(self, vmm: Vmm, config: Json, *, booting: bool) -> None:
        self.vmm = vmm
        cmdline = config.get("payload", {}).get("cmdline", "")
        self.words = cmdline.split()
        self.mounted: set[str] = set()
        self.serial = self._open_serial(config.get("serial", {}))
        self.pty_master, self.pty_path = self._open_console(config.get("console", {}))
        if self.pty_path is not None:
            config["console"]["file"] = self.pty_path
        if booting:
            self._boot_lines()
        if self.pty_master is not None and "vmfleet.ctl=hvc0" in self.words:
            threading.Thread(target=self._control_loop, daemon=True).start()
        self.vsock = HybridVsock(vmm, config["vsock"]) if config.get("vsock") else None

    def _open_serial(self, serial: Json) -> Any:
        if serial.get("mode") != "File":
            return None
        return open(serial["file"], "w", buffering=1)  # "w": CH truncates it too

    def _open_console(self, console: Json) -> tuple[int | None, str | None]:
        if console.get("mode") != "Pty":
            return None, None
        master, sub = os.openpty()
        tty.setraw(sub)
        self._sub = sub  # kept open, as CH's SIGWINCH listener keeps it
        return master, os.ttyname(sub)

    def write(self, line: str) -> None:
        if self.serial is not None and os.environ.get("CH_DOUBLE_KVM") != "broken":
            self.serial.write(line + "\n")

    def _boot_lines(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.write("[ch-double] Cloud Hypervisor test double: no kernel runs here; the lines")
        self.write("[ch-double] below imitate the ones vmfleet's init prints")
        if "vmfleet.probe=1" in self.words:
            self.write(PROBE_MARKER)
            if os.environ.get("CH_DOUBLE_KVM") != "broken":
                threading.Timer(0.3, self.vmm.guest_powered_off).start()
            return
        self.write(f"{stamp} [INFO] [boot] vmfleet init on kernel ch-double at 0.01s")
        self.write("[vmfleet] app started pid=1")

    def _control_loop(self) -> None:
        assert self.pty_master is not None
        buffered = b""
        while True:
            try:
                chunk = os.read(self.pty_master, 4096)
            except OSError:
                return
            buffered += chunk
            while b"\n" in buffered:
                raw, buffered = buffered.split(b"\n", 1)
                self.vmm.wait_until_running()
                reply = self._answer(raw.decode(errors="replace").strip())
                if reply is not None:
                    os.write(self.pty_master, reply.encode() + b"\n")
                if reply == "ok" and raw.startswith(b"shutdown"):
                    self.vmm.guest_powered_off()
                    return

    def _answer(self, line: str) -> str | None:
        words = line.split()
        if not words:
            return None
        match words[0]:
            case "ping":
                return " ".join(["pong", *words[1:2]])
            case "status":
                return "running 1"
            case "settime":
                return "ok"
            case "shutdown":
                return None if os.environ.get("CH_DOUBLE_HANG") else "ok"
            case "mount" if len(words) >= 4:
                return self._mount(words[1:])
            case "umount" if len(words) == 2:
                if words[1] not in self.mounted:
                    return f"err {words[1]} is not mounted"
                self.mounted.discard(words[1])
                return "ok"
        return f"err unknown command {words[0]}"

    def _mount(self, args: list[str]) -> str:
        device, path, mode = args[:3]
        for wanted in [device, *args[3:]]:
            serial = wanted.removeprefix("serial:")
            if not any(d.get("serial") == serial for d in self.vmm.config.get("disks", [])):
                return f"err device {wanted} did not appear"
        self.mounted.add(path)
        self.write(f"[ch-double] mounted {device} at {path} ({mode})")
        return "ok"

    def close(self) -> None:
        if self.vsock is not None:
            self.vsock.close()
        for fd in (self.pty_master, getattr(self, "_sub", None)):
            if fd is not None:
                os.close(fd)
        self.pty_master = None
        if self.serial is not None:
            self.serial.close()


class HybridVsock:
    """CH's vsock device as the host sees it: a unix socket taking ``CONNECT <port>``."""

    def __init__(self, vmm: Vmm, device: Json) -> None:
        self.vmm = vmm
        self.path = Path(device["socket"])
        self.path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            chunk = conn.recv(1)
            if not chunk:
                conn.close()
                return
            line += chunk
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit():
            conn.close()
            return
        target = os.environ.get("CH_DOUBLE_VSOCK_FORWARD")
        if target:
            guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                guest.connect(target)
            except OSError:
                conn.close()
                return
            conn.sendall(f"OK {words[1]}\n".encode())
            threading.Thread(target=_pipe, args=(guest, conn), daemon=True).start()
            _pipe(conn, guest)
        else:
            conn.sendall(f"OK {words[1]}\n".encode())
            self._pretend_agent(conn)

    def _pretend_agent(self, conn: socket.socket) -> None:
        parser = FrameParser()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.vmm.wait_until_running()
            for frame in parser.feed(data):
                answer = _pretend_answer(frame.kind, frame.sid, frame.payload)
                if answer:
                    with contextlib.suppress(OSError):
                        conn.sendall(answer)


def _pretend_answer(kind: int, sid: int, payload: bytes) -> bytes:
    if kind == Kind.HELLO:
        nonce = json.loads(payload).get("nonce")
        hello = {"version": 1, "nonce": nonce, "pid": 1, "agent": "ch-double"}
        return SYNC + encode(Kind.HELLO, 0, json.dumps(hello).encode())
    if kind == Kind.PING:
        return encode(Kind.PONG, 0, payload)
    if kind == Kind.OPEN:
        return encode(Kind.ABORT, sid, b"the Cloud Hypervisor test double runs no guest")
    return b""


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until either side closes, then close both."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


# -- the VMM -----------------------------------------------------------------------------------


class Vmm:
    def __init__(self, api_socket: Path) -> None:
        self.api_socket = api_socket
        self.lock = threading.Condition()
        self.state: str | None = None  # no VM
        self.config: Json = {}
        self.device_tree: dict[str, Json] = {}
        self.guest: Guest | None = None
        self.pending_ejects: set[str] = set()
        self.server: socketserver.BaseServer | None = None
        self._next_slot = 1

    # The pretend guest's side.

    def wait_until_running(self) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.state in ("Running", None, "Shutdown"))

    def guest_powered_off(self) -> None:
        """CH exits when its guest powers off."""
        with self.lock:
            self.state = "Shutdown"
            self.lock.notify_all()
        self.exit()

    def exit(self) -> None:
        """Stop serving (shortly: the answer being written gets out first), then exit."""
        if self.server is not None:
            threading.Timer(0.05, self.server.shutdown).start()

    # The API's side: one method per endpoint, under the lock.

    def handle(self, endpoint: str, body: Json) -> tuple[int, Json]:
        fail = os.environ.get("CH_DOUBLE_FAIL", "")
        if endpoint in fail.split(","):
            raise Refused(500, f"{endpoint} failed (CH_DOUBLE_FAIL)")
        handler = getattr(self, "op_" + endpoint.replace(".", "_").replace("-", "_"), None)
        if handler is None:
            raise Refused(500, f"{endpoint} is in the spec but not implemented by the double")
        with self.lock:
            result: tuple[int, Json] = handler(body)
            self.lock.notify_all()
        return result

    def op_vmm_ping(self, body: Json) -> tuple[int, Json]:
        version = os.environ.get("CH_DOUBLE_VERSION", "v48.0.0")
        return 200, {"version": version, "build_version": "ch-double", "pid": os.getpid()}

    def op_vmm_shutdown(self, body: Json) -> tuple[int, Json]:
        if not os.environ.get("CH_DOUBLE_HANG"):
            self.state = "Shutdown" if self.state else None
            self.exit()
        return 200, None  # the spec says 204; CH answers 200

    def op_vm_info(self, body: Json) -> tuple[int, Json]:
        self._require_vm()
        info = {"config": self.config, "state": self.state, "device_tree": self.device_tree}
        return 200, info

    def op_vm_create(self, body: Json) -> tuple[int, Json]:
        if self.state is not None:
            raise Refused(500, "VM is already created")
        self.config = copy.deepcopy(body)
        self.state = "Created"
        return 204, None

    def op_vm_delete(self, body: Json) -> tuple[int, Json]:
        self._stop_guest()
        self.state, self.config, self.device_tree = None, {}, {}
        return 204, None

    def op_vm_boot(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not created")
        if self.state not in ("Created", "Shutdown"):
            raise Refused(500, f"invalid state transition from {self.state} to Running")
        _check_bootable(self.config)
        self.device_tree = {}
        for disk in self.config.get("disks", []):
            self._plug(disk)
        self.guest = Guest(self, self.config, booting=True)
        self.state = "Running"
        return 204, None

    def op_vm_pause(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not created")
        if self.state != "Running":
            raise Refused(405, f"VM is {self.state}, not running")
        self.state = "Paused"
        return 204, None

    def op_vm_resume(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not booted")
        if self.state != "Paused":
            raise Refused(405, f"VM is {self.state}, not paused")
        self.state = "Running"
        self._eject_pending()
        return 204, None

    def op_vm_shutdown(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not created")
        if self.state not in ("Running", "Paused"):
            raise Refused(405, f"VM is {self.state}, not started")
        self._stop_guest()
        self.state = "Shutdown"
        return 204, None

    def op_vm_power_button(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not created")
        if self.state != "Running":
            raise Refused(405, f"VM is {self.state}, not booted")
        threading.Timer(0.2, self.guest_powered_off).start()
        return 204, None

    def op_vm_add_disk(self, body: Json) -> tuple[int, Json]:
        self._require_vm(500, "VM is not created")
        disk = dict(body)
        disk.setdefault("id", f"_disk{len(self.config.get('disks', []))}")
        if any(d.get("id") == disk["id"] for d in self.config.get("disks", [])):
            raise Refused(500, f"identifier {disk['id']} is already used")
        if self.state == "Created":  # cold: part of the config for the boot
            self.config.setdefault("disks", []).append(disk)
            return 204, None
        if not Path(disk.get("path", "")).exists():
            raise Refused(500, f"cannot open disk path {disk.get('path')}")
        self.config.setdefault("disks", []).append(disk)
        return 200, self._plug(disk)

    def op_vm_remove_device(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not created")
        device_id = body.get("id")
        if device_id not in self.device_tree:
            raise Refused(404, f"no device {device_id}")
        self.config["disks"] = [d for d in self.config.get("disks", []) if d["id"] != device_id]
        self.pending_ejects.add(device_id)
        if self.state == "Running":
            threading.Timer(0.2, self._eject_later).start()
        return 204, None

    def op_vm_snapshot(self, body: Json) -> tuple[int, Json]:
        self._require_vm(404, "VM is not created")
        if self.state == "Created":
            raise Refused(405, "VM is not booted")
        if self.state != "Paused":
            raise Refused(500, "trying to snapshot while the VM is running")
        target = _file_url_dir(body.get("destination_url", ""))
        (target / "config.json").write_text(json.dumps(self.config))
        state = {"double": "ch_double", "state": self.state, "device_tree": self.device_tree}
        (target / "state.json").write_text(json.dumps(state))
        (target / "memory-ranges").write_bytes(b"\0" * 4096)
        return 204, None

    def op_vm_restore(self, body: Json) -> tuple[int, Json]:
        if self.state is not None:
            raise Refused(404, "VM is already created")
        source = _file_url_dir(body["source_url"])
        try:
            config = json.loads((source / "config.json").read_text())
            state = json.loads((source / "state.json").read_text())
            (source / "memory-ranges").stat()
        except (OSError, ValueError) as exc:
            raise Refused(500, f"cannot restore from {source}: {exc}") from None
        for disk in config.get("disks", []):
            if not Path(disk["path"]).exists():
                raise Refused(500, f"cannot open disk path {disk['path']}")
        self.config, self.device_tree = config, state["device_tree"]
        self.guest = Guest(self, self.config, booting=False)
        self.state = "Paused"
        return 204, None

    # Helpers.

    def _require_vm(self, status: int = 500, message: str = "VM is not created") -> None:
        if self.state is None:
            raise Refused(status, message)

    def _plug(self, disk: Json) -> Json:
        device_id = disk.setdefault("id", f"_disk{self._next_slot}")
        bdf = f"0000:00:{self._next_slot + 2:02x}.0"
        self._next_slot += 1
        self.device_tree[device_id] = {
            "id": device_id,
            "resources": [],
            "children": [],
            "pci_bdf": bdf,
        }
        return {"id": device_id, "bdf": bdf}

    def _eject_later(self) -> None:
        with self.lock:
            if self.state == "Running":
                self._eject_pending()

    def _eject_pending(self) -> None:
        for device_id in self.pending_ejects:
            self.device_tree.pop(device_id, None)
        self.pending_ejects.clear()

    def _stop_guest(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None


def _check_bootable(config: Json) -> None:
    """What CH checks when it builds the VM, as far as a driver could get it wrong."""
    payload = config.get("payload", {})
    kernel = payload.get("kernel")
    if not kernel or not _is_pvh_elf(Path(kernel)):
        raise Refused(500, f"cannot load kernel {kernel}: not an ELF with a PVH entry note")
    if payload.get("initramfs") and not Path(payload["initramfs"]).is_file():
        raise Refused(500, f"cannot open initramfs {payload['initramfs']}")
    for disk in config.get("disks", []):
        if not Path(disk.get("path", "")).exists():
            raise Refused(500, f"cannot open disk path {disk.get('path')}")
    if config.get("console", {}).get("mode") == "Socket":
        raise Refused(500, "No socket option support for console device")
    for port in ("serial", "console"):
        if config.get(port, {}).get("mode") == "File" and not config[port].get("file"):
            raise Refused(500, f"{port} in File mode needs a file")
    memory = config.get("memory", {})
    if memory.get("hotplug_method") == "VirtioMem" and memory.get("hotplug_size", 0) % (
        VIRTIO_MEM_ALIGN
    ):
        raise Refused(500, "virtio-mem region size must be a multiple of 128 MiB")
    cpus = config.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
    if cpus["boot_vcpus"] > cpus["max_vcpus"]:
        raise Refused(500, "boot_vcpus is above max_vcpus")


def _is_pvh_elf(path: Path) -> bool:
    """The double's own reading of ELF notes (it shares no code with the driver)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        pos, end = offset, offset + size
        while p_type == 4 and pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _file_url_dir(url: str) -> Path:
    if not url.startswith("file://"):
        raise Refused(500, f"{url!r} is not a file:// URL")
    path = Path(url.removeprefix("file://"))
    if not path.is_absolute() or not path.is_dir():
        raise Refused(500, f"{path} is not an existing directory")
    return path


# -- HTTP ----------------------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, vmm: Vmm, spec: Spec, log: Path | None) -> None:
        super().__init__(str(path), _Handler)
        self.vmm, self.spec, self.log = vmm, spec, log
        self.log_lock = threading.Lock()

    def record(self, entry: Json) -> None:
        if self.log is None:
            return
        with self.log_lock, open(self.log, "a") as out:
            out.write(json.dumps(entry) + "\n")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        endpoint = self.path.removeprefix(PREFIX) if self.path.startswith(PREFIX) else self.path
        entry: Json = {"method": method, "endpoint": endpoint, "body": raw.decode(errors="replace")}
        try:
            if not self.path.startswith(PREFIX):
                raise Refused(404, f"{self.path} is not under {PREFIX}")
            body = self.server.spec.check_request(
                method, endpoint, self.headers.get("Content-Type", ""), raw
            )
            status, answer = self.server.vmm.handle(endpoint, body)
            self.server.spec.check_response(method, endpoint, status, answer)
        except Refused as exc:
            status, answer = exc.status, None
            entry["error"] = str(exc)
        except AssertionError as exc:  # the double's own answer was off-spec: its bug
            status, answer = 500, None
            entry["error"] = f"ch-double bug: {exc}"
        entry["status"] = status
        self.server.record(entry)
        self._respond(status, answer, entry.get("error"))

    def _respond(self, status: int, answer: Json, error: str | None) -> None:
        content = b""
        if answer is not None:
            content = json.dumps(answer).encode()
        elif error is not None:
            content = error.encode()
        self.send_response(status)
        if answer is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(content)

    def address_string(self) -> str:
        return "unix"  # a unix socket's peer has no address

    def log_message(self, format: str, *args: Any) -> None:
        print(f"ch-double: {format % args}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor", description=__doc__.split("\n")[0])
    parser.add_argument("--api-socket", type=Path)
    parser.add_argument("--version", action="store_true")
    args = parser.parse_args(argv)
    if args.version:
        print(f"cloud-hypervisor {os.environ.get('CH_DOUBLE_VERSION', 'v48.0.0')} (test double)")
        return 0
    if args.api_socket is None:
        parser.error("--api-socket is required (the double has no other way to be driven)")
    print(f"ch-double: a test double of Cloud Hypervisor, pid {os.getpid()}", file=sys.stderr)
    if os.environ.get("CH_DOUBLE_NO_SOCKET"):
        while True:  # a VMM that never gets its API up
            time.sleep(3600)
    log = Path(os.environ["CH_DOUBLE_LOG"]) if os.environ.get("CH_DOUBLE_LOG") else None
    vmm = Vmm(args.api_socket)
    server = _Server(args.api_socket, vmm, Spec(SPEC), log)
    vmm.server = server
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
        args.api_socket.unlink(missing_ok=True)  # CH removes its socket when it exits
        if vmm.guest is not None:
            vmm.guest.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
