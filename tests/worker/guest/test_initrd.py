"""initrd: module load order from modules.dep, cpio contents, content-keyed cache."""

from __future__ import annotations

import lzma
import stat
import subprocess
from pathlib import Path

import pytest

from worker.guest import GuestAssetError, KernelAssets, ensure_initrd, resolve_load_order
from worker.guest import initrd as initrd_mod
from worker.guest.initrd import (
    module_name,
    parse_modules_dep,
    parse_softdeps,
    strip_signature,
)

VERSION = "6.1.0-99-test-amd64"

FAKE_DEP = """\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/crc32c_generic.ko:
kernel/fs/unrelated.ko: kernel/lib/crc32c_generic.ko
"""  # noqa: E501


def _names(order: list[str]) -> list[str]:
    return [module_name(p) for p in order]


def _assert_deps_first(order: list[str], deps: dict[str, list[str]]) -> None:
    for i, mod in enumerate(order):
        for dep in deps[mod]:
            assert dep in order[:i], f"{dep} must load before {mod}"


def test_load_order_puts_dependencies_first() -> None:
    deps = parse_modules_dep(FAKE_DEP)
    order = resolve_load_order(
        deps, ["virtio_pci", "virtio_blk", "overlay"], optional=["virtio_net"]
    )
    _assert_deps_first(order, deps)
    assert len(order) == len(set(order))
    assert set(_names(order)) == {
        "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
        "virtio_blk", "overlay", "failover", "net_failover", "virtio_net",
    }  # fmt: skip
    assert "kernel/fs/unrelated.ko" not in order


def test_optional_missing_and_builtin_are_skipped() -> None:
    deps = parse_modules_dep(FAKE_DEP)
    order = resolve_load_order(
        deps,
        ["virtio_blk", "ext4"],
        optional=["evdev", "virtio-rng"],
        builtin=["kernel/fs/ext4/ext4.ko"],
    )
    assert _names(order) == ["virtio_ring", "virtio", "virtio_blk", "virtio_rng"]


def test_required_missing_module_raises() -> None:
    with pytest.raises(GuestAssetError, match="virtio_scsi"):
        resolve_load_order(parse_modules_dep(FAKE_DEP), ["virtio_scsi"])


def test_softdep_pre_is_loaded_first() -> None:
    deps = parse_modules_dep(FAKE_DEP)
    soft = parse_softdeps("# comment\nsoftdep overlay pre: crc32c_generic post: nothing\n")
    assert soft == {"overlay": ["crc32c_generic"]}
    order = resolve_load_order(deps, ["overlay"], softdeps=soft)
    assert _names(order) == ["crc32c_generic", "overlay"]


def test_dependency_cycle_is_an_error() -> None:
    deps = {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}
    with pytest.raises(GuestAssetError, match="cycle"):
        resolve_load_order(deps, ["a"])


def _fake_kernel(root: Path) -> KernelAssets:
    """A kernel tree whose .ko files are placeholders (the initrd copies bytes, never loads)."""
    mods = root / "lib" / "modules" / VERSION
    for rel in parse_modules_dep(FAKE_DEP):
        path = mods / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = f"fake module {rel}\n".encode()
        path.write_bytes(lzma.compress(payload) if rel.endswith(".xz") else payload)
    (mods / "modules.dep").write_text(FAKE_DEP)
    (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    bz = root / "boot" / f"vmlinuz-{VERSION}"
    bz.parent.mkdir(parents=True)
    bz.write_bytes(b"not really a kernel")
    return KernelAssets(version=VERSION, bzimage=bz, modules_root=mods)


def _cpio_list(image: Path) -> list[str]:
    out = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=image.open("rb"), capture_output=True, check=True
    )
    return out.stdout.decode().split()


def _cpio_extract(image: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        stdin=image.open("rb"),
        cwd=dest,
        check=True,
        capture_output=True,
    )


@pytest.mark.anyio
async def test_initrd_contents(tmp_path: Path) -> None:
    kernel = _fake_kernel(tmp_path / "k")
    image = await ensure_initrd(tmp_path / "data", kernel)
    assert image.parent.parent == tmp_path / "data" / "system" / "initrd"
    assert len(image.parent.name) == 64  # sha256 hex
    names = set(_cpio_list(image))
    for required in ("init", "bin/busybox", "bin/sh", "sbin/insmod", "etc/vmfleet/modules",
                     "etc/acpi/PWRF/00000080", "dev/console", "etc/vmfleet/fstab.disks",
                     "run/vmfleet"):  # fmt: skip
        assert required in names
    # Where the kernel itself would run modprobe: nothing, so a module it asks for by name
    # fails at once instead of starting a process (the init loads what its VM needs).
    assert "sbin/modprobe" not in names
    tree = tmp_path / "tree"
    _cpio_extract(image, tree)
    # The init mounts each step with one process and makes these links in /dev.
    assert "/dev/vdc /cfg ext4 ro,noload" in (tree / "etc/vmfleet/fstab.disks").read_text()
    assert (tree / "etc/vmfleet/dev/stdin").readlink() == Path("/proc/self/fd/0")
    assert (tree / "init").read_bytes() == initrd_mod.INIT_SCRIPT.read_bytes()
    order = (tree / "etc/vmfleet/modules").read_text().splitlines()
    assert all(p.startswith(f"/lib/modules/{VERSION}/") for p in order)
    # The compressed module is stored decompressed, under its .ko name.
    rng = f"/lib/modules/{VERSION}/kernel/drivers/char/hw_random/virtio-rng.ko"
    assert rng in order
    assert (
        tree / rng.lstrip("/")
    ).read_bytes() == b"fake module kernel/drivers/char/hw_random/virtio-rng.ko.xz\n"
    rel = [p.removeprefix(f"/lib/modules/{VERSION}/") for p in order]
    deps = {
        k.removesuffix(".xz"): [d.removesuffix(".xz") for d in v]
        for k, v in parse_modules_dep(FAKE_DEP).items()
    }
    _assert_deps_first(rel, deps)


@pytest.mark.anyio
async def test_the_init_is_told_which_module_each_device_needs(tmp_path: Path) -> None:
    kernel = _fake_kernel(tmp_path / "k")
    tree = tmp_path / "tree"
    _cpio_extract(await ensure_initrd(tmp_path / "data", kernel), tree)
    lines = [
        tuple(line.split())
        for line in (tree / "etc/vmfleet/module-devices").read_text().splitlines()
    ]
    # Modules of this kernel only (no console, vsock or ACPI modules in the fake one), each
    # once and after its dependencies, under the device they are for.
    when: dict[str, list[str]] = {}
    for device, name, path in lines:
        when.setdefault(device, []).append(name)
        assert path.startswith(f"/lib/modules/{VERSION}/kernel/") and path.endswith(".ko")
        assert module_name(path) == name and (tree / path.lstrip("/")).is_file()
    assert when == {
        "boot": [
            "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring", "virtio",
            "virtio_pci", "virtio_blk", "overlay",
        ],
        "0x1000": ["failover", "net_failover", "virtio_ring", "virtio", "virtio_net"],
        "0x1041": ["failover", "net_failover", "virtio_ring", "virtio", "virtio_net"],
        "0x1005": ["virtio_ring", "virtio", "virtio_rng"],
        "0x1044": ["virtio_ring", "virtio", "virtio_rng"],
    }  # fmt: skip
    # busybox modprobe's modules.dep: the stored (decompressed) paths, nothing else.
    dep = parse_modules_dep((tree / f"lib/modules/{VERSION}/modules.dep").read_text())
    assert dep["kernel/drivers/char/hw_random/virtio-rng.ko"] == [
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    ]
    assert "kernel/fs/unrelated.ko" not in dep
    assert all((tree / f"lib/modules/{VERSION}" / rel).is_file() for rel in dep)


@pytest.mark.anyio
async def test_cache_hit_does_not_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _fake_kernel(tmp_path / "k")
    data = tmp_path / "data"
    first = await ensure_initrd(data, kernel)
    stat = first.stat()

    def no_rebuild(*_args: object) -> None:
        raise AssertionError("initrd rebuilt although its inputs did not change")

    monkeypatch.setattr(initrd_mod, "_write_image", no_rebuild)
    again = await ensure_initrd(data, kernel)
    assert again == first
    assert again.stat().st_mtime_ns == stat.st_mtime_ns
    assert again.stat().st_ino == stat.st_ino
    monkeypatch.undo()

    # A changed input (init script, then a module's bytes) gives a new image.
    other_init = await ensure_initrd(data, kernel, init_script=b"#!/bin/sh\necho changed\n")
    assert other_init != first
    assert kernel.modules_root is not None
    (kernel.modules_root / "kernel/fs/overlayfs/overlay.ko").write_bytes(b"patched overlay\n")
    other_module = await ensure_initrd(data, kernel)
    assert other_module not in (first, other_init)


@pytest.mark.anyio
async def test_operator_initrd_is_used_as_is(tmp_path: Path) -> None:
    mine = tmp_path / "my-initrd.img"
    mine.write_bytes(b"operator")
    kernel = KernelAssets(version="x", bzimage=tmp_path / "bz", modules_root=None, initrd=mine)
    assert await ensure_initrd(tmp_path / "data", kernel) == mine
    assert not (tmp_path / "data").exists()


@pytest.mark.anyio
async def test_the_helper_goes_next_to_the_init_and_keys_the_cache(tmp_path: Path) -> None:
    """The init's helper goes in when it was built, changes the cache key when it changes,
    and is left out (a different initrd) when it is missing. The agent never goes in: it
    comes on the config disk."""
    kernel = _fake_kernel(tmp_path / "k")
    data = tmp_path / "data"
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x7fELF pretend v1")
    built = await ensure_initrd(data, kernel, runner=binary)
    tree = tmp_path / "tree"
    _cpio_extract(built, tree)
    assert (tree / "bin/vmfleet-run").read_bytes() == binary.read_bytes()
    assert (tree / "bin/vmfleet-run").stat().st_mode & 0o111
    assert "bin/vmfleet-agent" not in _cpio_list(built)
    binary.write_bytes(b"\x7fELF pretend v2")
    assert await ensure_initrd(data, kernel, runner=binary) != built
    without = await ensure_initrd(data, kernel, runner=tmp_path / "missing")
    assert without != built
    assert "bin/vmfleet-run" not in _cpio_list(without)


@pytest.mark.anyio
async def test_the_app_started_fifo_is_made_by_the_archive(tmp_path: Path) -> None:
    """The init waits on it until the app runs; the boot starts no mkfifo for it."""
    tree = tmp_path / "tree"
    _cpio_extract(await ensure_initrd(tmp_path / "data", _fake_kernel(tmp_path / "k")), tree)
    assert stat.S_ISFIFO((tree / "etc/vmfleet/app-started").lstat().st_mode)


def _signed(body: bytes, signature: bytes) -> bytes:
    info = bytes(8) + len(signature).to_bytes(4, "big")  # struct module_signature
    return body + signature + info + b"~Module signature appended~\n"


def test_module_signatures_are_stripped() -> None:
    body = b"\x7fELF a module's code"
    assert strip_signature(_signed(body, b"S" * 300)) == body
    assert strip_signature(body) == body
    # A signature length reaching before the file's start leaves the module as it is.
    bogus = b"code" + (1 << 20).to_bytes(4, "big") + b"~Module signature appended~\n"
    assert strip_signature(bogus) == bogus


@pytest.mark.anyio
async def test_modules_go_in_without_their_signatures(tmp_path: Path) -> None:
    kernel = _fake_kernel(tmp_path / "k")
    module = kernel.modules_root / "kernel/fs/overlayfs/overlay.ko"  # type: ignore[operator]
    module.write_bytes(_signed(b"overlay code", b"X" * 512))
    tree = tmp_path / "tree"
    _cpio_extract(await ensure_initrd(tmp_path / "data", kernel), tree)
    assert (tree / f"lib/modules/{VERSION}/kernel/fs/overlayfs/overlay.ko").read_bytes() == (
        b"overlay code"
    )
