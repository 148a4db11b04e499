"""Session services every integration test shares: NATS, an OCI registry, a test image.

All of them are real. NATS runs as a container when a Docker engine answers (testcontainers)
and otherwise as the nats-server binary from the virtualenv; each test gets its own subject
prefix, so tests sharing one server never see each other's streams and buckets.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from cli.embedded_nats import NatsServerProcess
from tests.support.images import build_busybox_image, push_image
from tests.support.processes import live_children
from tests.support.registry import LocalRegistry

# Tests write only to temporary directories: no example database, and hypothesis's own
# caches in a directory of this run's, not in the work tree.
settings.register_profile("vmfleet", database=None)
settings.load_profile("vmfleet")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="vmfleet-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _docker_engine_answers() -> bool:
    if not Path("/var/run/docker.sock").exists() and "DOCKER_HOST" not in os.environ:
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One JetStream-enabled NATS server for the whole session."""
    if _docker_engine_answers():
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    server = _suite_nats_server(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


def _suite_nats_server(root: Path) -> NatsServerProcess:
    """A nats-server whose JetStream may reserve far more file storage than the disk has.

    Every test fleet has its own subject prefix and so its own 1 GiB logs stream, and a
    strict JetStream counts each stream's max_bytes against its limit (by default 75 % of
    the free disk) though the tests write only kilobytes: without this the suite would stop
    being able to create streams after some sixty fleets, whatever the disk holds."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "limits.conf"
    config.write_text("jetstream { max_file_store: 4TB }\n")
    return NatsServerProcess(root, extra_args=("--config", str(config)))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    """A NATS server of this test's own, for tests that stop or kill it."""
    server = _suite_nats_server(tmp_path / "nats")
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def subject_prefix() -> str:
    """A fresh prefix: this test's streams and buckets are its own."""
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    reg = LocalRegistry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def busybox_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``127.0.0.1:PORT/busybox:latest``: busybox-static, cmd prints a line and sleeps."""
    source = build_busybox_image(tmp_path_factory.mktemp("oci") / "layout")
    return push_image(source, registry.address, "busybox:latest")


@pytest.fixture(scope="session")
def test_assets() -> Path:
    """Where `make test` fetched the guest kernel (read-mostly, shared across runs)."""
    return Path(
        os.environ.get("VMFLEET_TEST_ASSETS", Path(__file__).parents[1] / ".cache/test-assets")
    )


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    yield
    left = live_children()
    assert not left, f"the test run left processes behind: {left}"
