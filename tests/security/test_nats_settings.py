"""NATS_USER / NATS_PASSWORD / NATS_TOKEN / NATS_CREDS / NATS_TLS_*: checked at start-up,
one line naming the variable, and handed to the connection unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.daemons import bus_options
from cli.settings import ConfigError, load_settings
from natsbus import inbox_prefix
from schemas.subjects import Subjects
from tests.support.secure_nats import Certificates, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def test_no_nats_settings_mean_an_anonymous_plain_connection() -> None:
    bus = bus_options(load_settings({}), "gw")
    assert (bus.user, bus.password, bus.token, bus.credentials_file) == (None, None, None, None)
    assert not bus.uses_tls


def test_user_and_password_reach_the_connection_and_stay_out_of_reprs() -> None:
    settings = load_settings({"NATS_USER": "vmfleet-gateway", "NATS_PASSWORD": "s3cret"})
    bus = bus_options(settings, "gw")
    assert (bus.user, bus.password) == ("vmfleet-gateway", "s3cret")
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(bus)


def test_each_component_gets_the_inbox_its_user_may_read() -> None:
    settings = load_settings({"VMFLEET_SUBJECT_PREFIX": "fleet1"})
    assert bus_options(settings, "gw").inbox_prefix == inbox_prefix(Subjects("fleet1"))
    worker = bus_options(settings, "w", host="h1")
    assert worker.inbox_prefix == "_INBOX.fleet1.worker.h1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NATS_USER": "u"}, "NATS_PASSWORD: required with NATS_USER"),
        ({"NATS_PASSWORD": "p"}, "NATS_USER: required with NATS_PASSWORD"),
        (
            {"NATS_USER": "u", "NATS_PASSWORD": "p", "NATS_TOKEN": "t"},
            "NATS_TOKEN: set only one of NATS_CREDS, NATS_USER",
        ),
        ({"NATS_CREDS": "/nonexistent/x.creds"}, "NATS_CREDS: /nonexistent/x.creds is not a file"),
        ({"NATS_TLS_CA": "/nonexistent/ca.pem"}, "NATS_TLS_CA: /nonexistent/ca.pem is not a file"),
    ],
)
def test_bad_combinations_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        load_settings(env)


def test_tls_files_are_loaded_at_start_up(tmp_path: Path, certs: Certificates) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^NATS_TLS_CA: .* is not a PEM CA certificate"):
        load_settings({"NATS_TLS_CA": str(garbage)})
    with pytest.raises(ConfigError, match=r"^NATS_TLS_KEY: required with NATS_TLS_CERT"):
        load_settings({"NATS_TLS_CERT": str(certs.client_cert)})
    with pytest.raises(ConfigError, match=r"^NATS_TLS_CERT: .* is not a PEM certificate and its"):
        # a key that is not the certificate's
        load_settings(
            {"NATS_TLS_CERT": str(certs.client_cert), "NATS_TLS_KEY": str(certs.server_key)}
        )
    settings = load_settings(
        {
            "NATS_TLS_CA": str(certs.ca),
            "NATS_TLS_CERT": str(certs.client_cert),
            "NATS_TLS_KEY": str(certs.client_key),
        }
    )
    bus = bus_options(settings, "w", host="h1")
    assert (bus.tls_ca_file, bus.tls_cert_file, bus.tls_key_file) == (
        str(certs.ca),
        str(certs.client_cert),
        str(certs.client_key),
    )
    assert bus.uses_tls


def test_a_creds_file_needs_the_nkeys_package(tmp_path: Path) -> None:
    creds = tmp_path / "worker.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    try:
        import nkeys  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^NATS_CREDS: needs the Python package nkeys"):
            load_settings({"NATS_CREDS": str(creds)})
    else:
        assert bus_options(load_settings({"NATS_CREDS": str(creds)}), "w").credentials_file
