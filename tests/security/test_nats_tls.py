"""TLS to NATS: a component verifies the server with NATS_TLS_CA, presents NATS_TLS_CERT /
NATS_TLS_KEY where the server asks, and otherwise stops at once with one line naming the
setting (a real nats-server with the generated config's tls block; openssl's certificates).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.daemons import bus_options, reach_nats
from cli.settings import ConfigError, load_settings
from natsbus import ServerTls
from tests.support.secure_nats import Certificates, GatewayProcess, SecureNats, make_certificates

pytestmark = pytest.mark.anyio

VMFLEET = str(Path(sys.executable).parent / "vmfleet")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_nats(tmp_path: Path, subject_prefix: str, certs: Certificates) -> Iterator[SecureNats]:
    tls = ServerTls(cert_file=str(certs.server_cert), key_file=str(certs.server_key))
    with SecureNats(tmp_path / "nats", subject_prefix, ("h1",), tls=tls) as server:
        yield server


@pytest.fixture
def mtls_nats(tmp_path: Path, subject_prefix: str, certs: Certificates) -> Iterator[SecureNats]:
    tls = ServerTls(str(certs.server_cert), str(certs.server_key), ca_file=str(certs.ca))
    with SecureNats(tmp_path / "nats", subject_prefix, ("h1",), tls=tls) as server:
        yield server


async def _reach(env: dict[str, str], host: str | None = None) -> None:
    """What `vmfleet gateway` / `vmfleet worker` do first: settings, then one connection."""
    settings = load_settings(env)
    await reach_nats(bus_options(settings, "tls-test", host=host))


async def test_a_component_trusts_the_server_through_nats_tls_ca(
    tls_nats: SecureNats, certs: Certificates
) -> None:
    await _reach({**tls_nats.env(), "NATS_TLS_CA": str(certs.ca)})
    await _reach({**tls_nats.env("h1"), "NATS_TLS_CA": str(certs.ca)}, host="h1")


async def test_without_nats_tls_ca_the_certificate_is_not_trusted(tls_nats: SecureNats) -> None:
    with pytest.raises(ConfigError, match=r"TLS certificate not trusted .*set NATS_TLS_CA"):
        await _reach(tls_nats.env())


async def test_a_server_that_verifies_clients_wants_nats_tls_cert(
    mtls_nats: SecureNats, certs: Certificates
) -> None:
    env = {**mtls_nats.env(), "NATS_TLS_CA": str(certs.ca)}
    with pytest.raises(ConfigError, match=r"TLS handshake failed .*NATS_TLS_CERT and NATS_TLS_KEY"):
        await _reach(env)
    await _reach(
        {**env, "NATS_TLS_CERT": str(certs.client_cert), "NATS_TLS_KEY": str(certs.client_key)}
    )


async def test_tls_settings_refuse_a_plain_text_server(
    tmp_path: Path, subject_prefix: str, certs: Certificates
) -> None:
    with (
        SecureNats(tmp_path / "nats", subject_prefix, ("h1",)) as plain,
        pytest.raises(ConfigError, match=r"does not require TLS"),
    ):
        await _reach({**plain.env(), "NATS_TLS_CA": str(certs.ca)})


async def test_wrong_credentials_stop_start_up_at_once(
    tls_nats: SecureNats, certs: Certificates
) -> None:
    env = {**tls_nats.env(), "NATS_TLS_CA": str(certs.ca), "NATS_PASSWORD": "not-the-password"}
    with pytest.raises(ConfigError, match=r"refused the credentials .*NATS_USER and NATS_PASSWORD"):
        await _reach(env)


def test_the_gateway_process_over_tls(
    tls_nats: SecureNats, certs: Certificates, tmp_path: Path
) -> None:
    """The real `vmfleet gateway`: without the CA it exits 2 with one line; with it, it
    serves the fleet."""
    env = {**os.environ, **tls_nats.env(), "JWT_SECRET": "s" * 32}
    refused = subprocess.run(
        [VMFLEET, "gateway", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("vmfleet: configuration error: NATS at nats://127.0.0.1:")
    assert "TLS certificate not trusted" in last and "NATS_TLS_CA" in last

    gateway = GatewayProcess({**tls_nats.env(), "NATS_TLS_CA": str(certs.ca)}, tmp_path / "gw.log")
    gateway.start()
    try:
        gateway.wait_ready()
        with gateway.client() as client:
            assert client.get("/hosts").json() == []
    finally:
        gateway.stop()
