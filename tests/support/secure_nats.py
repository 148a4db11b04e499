"""A nats-server that enforces a fleet's generated accounts and permissions (the output of
``vmfleet nats-config``), connections as one of the fleet's users that record what the
server refused, throwaway certificates for TLS, and a real ``vmfleet gateway`` process."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
from nats.aio.client import Client

from cli.embedded_nats import NatsServerProcess, free_port
from cli.token import mint_token
from natsbus import (
    ServerTls,
    admin_user,
    complete_passwords,
    fleet_users,
    inbox_prefix,
    password_variable,
    render_passwords,
    render_server_config,
)
from schemas.subjects import Subjects

__all__ = ["Certificates", "GatewayProcess", "Probe", "SecureNats", "make_certificates"]

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


class SecureNats:
    """nats-server (JetStream) with the generated config for ``hosts`` of fleet ``prefix``."""

    def __init__(
        self, root: Path, prefix: str, hosts: tuple[str, ...], *, tls: ServerTls | None = None
    ) -> None:
        self.subjects = Subjects(prefix)
        self.hosts = hosts
        root.mkdir(parents=True, exist_ok=True)
        passwords, _ = complete_passwords(self.subjects, hosts, {})
        self.passwords = passwords
        (root / "vmfleet-passwords.conf").write_text(render_passwords(passwords))
        self.config = root / "nats-server.conf"
        self.config.write_text(render_server_config(self.subjects, hosts, tls=tls))
        self.server = NatsServerProcess(root / "nats", extra_args=("--config", str(self.config)))

    def __enter__(self) -> SecureNats:
        self.server.start()
        try:
            self.server.wait_ready()
        except BaseException:
            self.server.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def user(self, host: str | None = None) -> str:
        """The gateway's user (``host`` None) or the worker user of ``host``."""
        for user in fleet_users(self.subjects, self.hosts):
            if user.host == host:
                return user.name
        raise KeyError(host)

    def password(self, user: str) -> str:
        return self.passwords[password_variable(user)]

    def env(self, host: str | None = None) -> dict[str, str]:
        """What a gateway (``host`` None) or the worker of ``host`` is started with."""
        user = self.user(host)
        return {
            "NATS_URL": self.url,
            "NATS_USER": user,
            "NATS_PASSWORD": self.password(user),
            "VMFLEET_SUBJECT_PREFIX": self.subjects.prefix,
        }

    async def connect(self, host: str | None = None, *, admin: bool = False) -> Probe:
        """Connect as the gateway user, the worker user of ``host``, or the admin."""
        user = admin_user(self.subjects) if admin else self.user(host)
        probe = Probe(user)
        inbox = "_INBOX" if admin else inbox_prefix(self.subjects, host)
        probe.nc = await nats.connect(
            self.url,
            user=user,
            password=self.password(user),
            inbox_prefix=inbox,
            error_cb=probe.on_error,
            allow_reconnect=False,
            name="probe",
        )
        return probe


@dataclass
class Probe:
    """A connection as one user, and every error the server sent it."""

    user: str
    errors: list[str] = field(default_factory=list)
    nc: Client = field(init=False)

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]

    def refused(self, subject: str, *, subscribe: bool = False) -> bool:
        """The server refused this user a publish to ``subject`` (or a subscription)."""
        what = "subscription" if subscribe else "publish"
        wanted = f'for {what} to "{subject}"'.lower()
        return any(wanted in e.lower() for e in self.violations())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, and a client
    certificate, all signed by that CA (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=vmfleet test CA", "-keyout", "ca.key", "-out", "ca.pem",
    )  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(extensions + "\n")
        run(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=vmfleet test {name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
        )  # fmt: skip
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


class GatewayProcess:
    """``vmfleet gateway`` on a loopback port, in a process of its own."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.secret = secrets.token_hex(16)
        self.env = {**os.environ, "JWT_SECRET": self.secret, "VMFLEET_LOG_LEVEL": "INFO", **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.secret)}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(), timeout=60)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [VMFLEET, "gateway", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until it serves (its lifespan, which connects and provisions, has run)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"gateway not serving after {timeout_s}s: {self.output()}")

    def wait_exit(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
