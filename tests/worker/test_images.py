"""The image cache against the real local registry, skopeo, umoci and mkfs.ext4."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from cli.embedded_nats import free_port
from schemas.errors import BadRequest, Conflict, NotFound
from schemas.references import ImageRef, normalize_reference
from tests.support.images import build_busybox_image, push_image
from tests.support.registry import LocalRegistry
from worker.images import (
    CommandFailed,
    ImageCache,
    ImageInfo,
    RegistryUnavailable,
    run_command,
    uses_plain_http,
)

pytestmark = pytest.mark.anyio

BUSYBOX_CMD = ["/bin/sh", "-c", "echo hello from busybox; sleep 3600"]
BUSYBOX_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


class RecordingRunner:
    """The real runner, remembering every command (and failing the ones told to)."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    async def __call__(self, argv: Sequence[str], timeout_s: float) -> bytes:
        self.calls.append(list(argv))
        if self.fail is not None and self.fail in argv:
            raise CommandFailed(argv, 1, f"{self.fail}: injected failure")
        return await run_command(argv, timeout_s)

    def count(self, word: str) -> int:
        return sum(word in call for call in self.calls)


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if not path.is_dir())


async def tool_output(*argv: str) -> str:
    done = await anyio.run_process(list(argv))
    return done.stdout.decode()


def registry_manifest(reference: str) -> bytes:
    """The manifest bytes the registry serves for ``host:port/repo:tag``."""
    host, _, rest = reference.partition("/")
    repository, _, tag = rest.rpartition(":")
    request = urllib.request.Request(
        f"http://{host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body: bytes = response.read()
        return body


def digest_of(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def copy_image(source: str, destination: str) -> None:
    """Copy an image between repositories of the plain-HTTP test registry."""
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{source}",
            f"docker://{destination}",
        ],
        check=True,
        capture_output=True,
    )


def push_index(registry: str, repository: str, tag: str, platforms: dict[str, str]) -> str:
    """Push an OCI index whose ``linux/<arch>`` entries point at existing tags."""
    manifests = []
    for arch, source_tag in platforms.items():
        raw = registry_manifest(f"{registry}/{repository}:{source_tag}")
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest_of(raw),
                "size": len(raw),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{tag}",
        data=body.encode(),
        method="PUT",
        headers={"Content-Type": OCI_INDEX},
    )
    with urllib.request.urlopen(request, timeout=5):
        pass
    return f"{registry}/{repository}:{tag}"


@pytest.fixture(scope="module")
def nocmd_image(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image whose config has neither entrypoint nor cmd."""
    layout = tmp_path_factory.mktemp("nocmd") / "layout"
    source = build_busybox_image(layout, cmd=(), workdir="/app", env=("A=1", "B=x=y"))
    return push_image(source, registry.address, "nocmd:latest")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def runner() -> RecordingRunner:
    return RecordingRunner()


@pytest.fixture
def cache(root: Path, runner: RecordingRunner) -> ImageCache:
    return ImageCache(root, runner=runner)


# --------------------------------------------------------------------------------------------
# Reference normalisation (pure)
# --------------------------------------------------------------------------------------------


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("given", "name", "registry", "repository"),
    [
        ("alpine", "docker.io/library/alpine:latest", "docker.io", "library/alpine"),
        ("library/alpine:3.20", "docker.io/library/alpine:3.20", "docker.io", "library/alpine"),
        ("user/app", "docker.io/user/app:latest", "docker.io", "user/app"),
        ("docker.io/alpine", "docker.io/library/alpine:latest", "docker.io", "library/alpine"),
        ("index.docker.io/x/y", "docker.io/x/y:latest", "docker.io", "x/y"),
        ("ghcr.io/x/y:tag", "ghcr.io/x/y:tag", "ghcr.io", "x/y"),
        ("localhost:5000/a", "localhost:5000/a:latest", "localhost:5000", "a"),
        ("localhost/a/b_c.d-e", "localhost/a/b_c.d-e:latest", "localhost", "a/b_c.d-e"),
        ("[::1]:5000/a:v1", "[::1]:5000/a:v1", "[::1]:5000", "a"),
        ("127.0.0.1:5000/x/y:1.0", "127.0.0.1:5000/x/y:1.0", "127.0.0.1:5000", "x/y"),
        (f"alpine@{DIGEST}", f"docker.io/library/alpine@{DIGEST}", "docker.io", "library/alpine"),
        (
            f"alpine:3@{DIGEST}",
            f"docker.io/library/alpine:3@{DIGEST}",
            "docker.io",
            "library/alpine",
        ),
        ("localhost:5000", "docker.io/library/localhost:5000", "docker.io", "library/localhost"),
    ],
)
def test_normalize_reference(given: str, name: str, registry: str, repository: str) -> None:
    ref = normalize_reference(given)
    assert (ref.name, ref.registry, ref.repository) == (name, registry, repository)


def test_digest_reference_keeps_digest_and_has_no_default_tag() -> None:
    ref = normalize_reference(f"ghcr.io/x/y@{DIGEST}")
    assert ref == ImageRef(registry="ghcr.io", repository="x/y", tag=None, digest=DIGEST)


@pytest.mark.parametrize(
    "given",
    [
        "",
        " alpine",
        "Alpine",
        "user/App",
        "ghcr.io/X/y",
        "a..b",
        "a/../b",
        "a//b",
        "-a",
        "a-",
        "a b",
        "alpine:",
        "alpine:-bad",
        "alpine:" + "t" * 129,
        "alpine@sha256:short",
        "alpine@sha256:" + "AB" * 32,
        "alpine@md5:" + "ab" * 16,
        "alpine@",
        "a" * 256,
        "x/" * 200 + "y",
        "ab" * 32,
        "my_registry:5000/a",
        "alpine$",
    ],
)
def test_invalid_references_are_bad_requests(given: str) -> None:
    with pytest.raises(BadRequest) as caught:
        normalize_reference(given)
    assert caught.value.code == "invalid_name"
    assert caught.value.message.startswith("invalid image name: ")


@pytest.mark.parametrize(
    ("registry", "insecure", "plain"),
    [
        ("127.0.0.1:5000", frozenset[str](), True),
        ("127.9.9.9", frozenset[str](), True),
        ("localhost:5000", frozenset[str](), True),
        ("[::1]:5000", frozenset[str](), True),
        ("docker.io", frozenset[str](), False),
        ("10.0.0.5:5000", frozenset[str](), False),
        ("reg.lan:5000", frozenset({"reg.lan:5000"}), True),
        ("reg.lan:5000", frozenset({"reg.lan"}), True),
        ("reg.lan:5001", frozenset({"reg.lan:5000"}), False),
    ],
)
def test_transport_policy(registry: str, insecure: frozenset[str], plain: bool) -> None:
    assert uses_plain_http(registry, insecure) is plain


# --------------------------------------------------------------------------------------------
# Pulls against the real registry
# --------------------------------------------------------------------------------------------


async def test_pull_makes_an_ext4_disk_with_the_image_config(
    cache: ImageCache, root: Path, busybox_image: str
) -> None:
    statuses: list[str] = []
    info = await cache.pull(busybox_image, statuses.append)

    assert statuses == ["pulling", "converting", "ready"]
    assert info.name == f"{busybox_image}"
    assert info.digest == digest_of(registry_manifest(busybox_image))
    assert (info.entrypoint, info.cmd) == ([], BUSYBOX_CMD)
    assert info.env == BUSYBOX_ENV
    assert info.working_dir == "/"
    assert info.has_command
    disk = root / "disks" / info.digest.removeprefix("sha256:") / "rootfs.ext4"
    assert info.disk == disk
    assert info.size_bytes == disk.stat().st_size >= 10 << 20
    assert (disk.parent / "metadata.json").is_file()
    header = await tool_output("dumpe2fs", "-h", str(disk))
    assert "Filesystem magic number:  0xEF53" in header
    assert "has_journal" not in header
    listing = await tool_output("debugfs", "-R", "ls /bin", str(disk))
    assert "busybox" in listing and "sh" in listing
    if os.geteuid() == 0:  # a plain (not rootless) unpack keeps the image's owners
        assert "User:     0   Group:     0" in await tool_output(
            "debugfs", "-R", "stat /bin/busybox", str(disk)
        )
    assert list((root / "tmp").iterdir()) == []


async def test_second_pull_reuses_the_disk(
    cache: ImageCache, runner: RecordingRunner, busybox_image: str
) -> None:
    first = await cache.pull(busybox_image)
    before = first.disk.stat()
    runner.calls.clear()

    statuses: list[str] = []
    second = await cache.pull(busybox_image, statuses.append)

    assert statuses == ["ready"]
    assert second == first
    assert (runner.count("copy"), runner.count("umoci"), runner.count("mkfs.ext4")) == (0, 0, 0)
    after = second.disk.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_a_new_cache_on_the_same_root_reuses_disks_and_sweeps_leftovers(
    root: Path, busybox_image: str
) -> None:
    info = await ImageCache(root).pull(busybox_image)
    (root / "tmp" / "dead-pull").mkdir()
    half_done = root / "disks" / ("0" * 64)
    half_done.mkdir()
    (half_done / "rootfs.ext4").write_bytes(b"partial")

    runner = RecordingRunner()
    again = ImageCache(root, runner=runner)

    assert not half_done.exists() and list((root / "tmp").iterdir()) == []
    assert again.get(info.digest) == info
    assert again.get(busybox_image) == info
    assert again.list() == [info]
    assert await again.pull(busybox_image) == info
    assert runner.count("copy") == 0


async def test_concurrent_pulls_of_one_digest_do_the_work_once(
    cache: ImageCache, runner: RecordingRunner, root: Path, busybox_image: str
) -> None:
    results: list[ImageInfo] = []

    async def pull() -> None:
        results.append(await cache.pull(busybox_image))

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        tg.start_soon(pull)

    assert len(results) == 2 and results[0] == results[1]
    assert (runner.count("copy"), runner.count("mkfs.ext4")) == (1, 1)
    assert len(list((root / "disks").iterdir())) == 1


async def test_different_images_share_one_oci_layout(
    cache: ImageCache, root: Path, busybox_image: str, nocmd_image: str
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.pull, busybox_image)
        tg.start_soon(cache.pull, nocmd_image)

    index = json.loads((root / "oci-cache" / "index.json").read_text())
    assert len(index["manifests"]) == 2
    assert {info.name for info in cache.list()} == {busybox_image, nocmd_image}


async def test_an_image_without_a_command_is_cached(cache: ImageCache, nocmd_image: str) -> None:
    info = await cache.pull(nocmd_image)

    assert (info.entrypoint, info.cmd, info.has_command) == ([], [], False)
    assert info.env == {"A": "1", "B": "x=y"}
    assert info.working_dir == "/app"


async def test_an_index_resolves_to_the_host_platform(
    root: Path, registry: LocalRegistry, busybox_image: str, nocmd_image: str
) -> None:
    copy_image(busybox_image, f"{registry.address}/multi:arm")
    copy_image(nocmd_image, f"{registry.address}/multi:amd")
    multi = push_index(registry.address, "multi", "v1", {"arm64": "arm", "amd64": "amd"})
    amd_digest = digest_of(registry_manifest(nocmd_image))
    arm_digest = digest_of(registry_manifest(busybox_image))

    assert await ImageCache(root, arch="amd64").resolve_digest(multi) == amd_digest
    assert await ImageCache(root, arch="arm64").resolve_digest(multi) == arm_digest
    with pytest.raises(BadRequest) as caught:
        await ImageCache(root, arch="s390x").resolve_digest(multi)
    assert caught.value.code == "unsupported_platform"

    info = await ImageCache(root, arch="amd64").pull(multi)
    assert info.digest == amd_digest and info.name == multi


async def test_a_digest_reference_pulls_and_is_found_by_digest(
    cache: ImageCache, busybox_image: str
) -> None:
    digest = digest_of(registry_manifest(busybox_image))
    repository = busybox_image.rpartition(":")[0]

    info = await cache.pull(f"{repository}@{digest}")

    assert info.digest == digest and info.name == f"{repository}@{digest}"
    assert cache.get(digest) is not None
    assert cache.get(f"{repository}@{digest}") == info


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repository", ["does-not-exist:latest", "busybox:no-such-tag"])
async def test_unknown_image_is_not_found(
    cache: ImageCache, root: Path, registry: LocalRegistry, busybox_image: str, repository: str
) -> None:
    statuses: list[str] = []
    with pytest.raises(NotFound) as caught:
        await cache.pull(f"{registry.address}/{repository}", statuses.append)
    assert (caught.value.code, caught.value.message) == ("not_found", "image not found")
    assert statuses == []
    assert files_under(root) == []


async def test_registry_down_is_a_typed_error_and_leaves_nothing(
    cache: ImageCache, root: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnavailable) as caught:
        await cache.pull(f"{closed}/busybox:latest")
    assert caught.value.code == "registry_unavailable"
    assert closed in caught.value.message and "connection refused" in caught.value.message
    assert files_under(root) == []


async def test_a_failed_conversion_leaves_no_disk_and_a_retry_succeeds(
    root: Path, busybox_image: str
) -> None:
    failing = ImageCache(root, runner=RecordingRunner(fail="mkfs.ext4"))
    statuses: list[str] = []
    with pytest.raises(Exception, match="injected failure"):
        await failing.pull(busybox_image, statuses.append)

    assert statuses[:2] == ["pulling", "converting"]
    assert statuses[-1].startswith("failed: ") and "injected failure" in statuses[-1]
    assert list((root / "disks").iterdir()) == [] and list((root / "tmp").iterdir()) == []
    assert failing.get(busybox_image) is None and failing.list() == []

    info = await ImageCache(root).pull(busybox_image)
    assert info.disk.is_file()


async def test_registry_down_with_the_tag_cached_serves_the_cached_disk(
    tmp_path: Path, busybox_image: str
) -> None:
    own = LocalRegistry(tmp_path / "registry")
    own.start()
    try:
        source = build_busybox_image(tmp_path / "oci" / "layout")
        reference = push_image(source, own.address, "app:v1")
        cache = ImageCache(tmp_path / "images")
        info = await cache.pull(reference)
    finally:
        own.stop()

    statuses: list[str] = []
    assert await cache.pull(reference, statuses.append) == info
    assert statuses == ["ready"]
    with pytest.raises(RegistryUnavailable):
        await cache.pull(f"{own.address}/app:not-cached")


async def test_tls_is_verified_except_for_loopback_and_insecure_registries(root: Path) -> None:
    seen: list[list[str]] = []

    async def refusing(argv: Sequence[str], timeout_s: float) -> bytes:
        seen.append(list(argv))
        raise CommandFailed(argv, 1, 'level=fatal msg="dial tcp: connection refused"')

    cache = ImageCache(root, frozenset({"reg.lan:5000"}), runner=refusing)
    for reference in ("ghcr.io/x/y", "reg.lan:5000/x", "localhost:5000/x"):
        with pytest.raises(RegistryUnavailable):
            await cache.resolve_digest(reference)

    flags = [next(arg for arg in argv if arg.startswith("--tls-verify")) for argv in seen]
    assert flags == ["--tls-verify=true", "--tls-verify=false", "--tls-verify=false"]
    assert all(
        argv[:5] == ["skopeo", "--override-os", "linux", "--override-arch", cache.arch]
        for argv in seen
    )


async def test_a_registry_timeout_is_a_typed_error(root: Path) -> None:
    async def hanging(argv: Sequence[str], timeout_s: float) -> bytes:
        raise CommandFailed(argv, None, f"no result after {timeout_s:g}s")

    with pytest.raises(RegistryUnavailable, match="did not answer"):
        await ImageCache(root, runner=hanging).resolve_digest("ghcr.io/x/y")


# --------------------------------------------------------------------------------------------
# Delete
# --------------------------------------------------------------------------------------------


async def test_delete_refuses_an_image_in_use_then_removes_it(
    cache: ImageCache, root: Path, busybox_image: str
) -> None:
    info = await cache.pull(busybox_image)

    with pytest.raises(Conflict):
        await cache.delete(info.digest, in_use=lambda digest: digest == info.digest)
    assert info.disk.is_file()

    await cache.delete(info.digest, in_use=lambda digest: False)

    assert not info.disk.parent.exists()
    assert cache.get(info.digest) is None and cache.get(busybox_image) is None
    assert list((root / "oci-cache" / "blobs" / "sha256").iterdir()) == []
    with pytest.raises(NotFound):
        await cache.delete(info.digest)
