"""Test images built with umoci from busybox-static and pushed with skopeo."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_busybox_image", "push_image"]


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _busybox_rootfs(root: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not installed: run `make test`, which installs busybox-static")
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    for applet in _run(busybox, "--list").split():
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    for sub in ("etc", "tmp", "root", "app"):
        (root / sub).mkdir()
    (root / "etc" / "hostname").write_text("busybox\n")


def build_busybox_image(
    layout: Path,
    *,
    tag: str = "latest",
    cmd: Sequence[str] = ("/bin/sh", "-c", "echo hello from busybox; sleep 3600"),
    entrypoint: Sequence[str] = (),
    env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    workdir: str = "/",
) -> str:
    """Build an OCI layout at ``layout`` holding ``busybox:<tag>``; return ``oci:DIR:TAG``."""
    rootfs = layout.parent / f"{layout.name}-rootfs-{tag}"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    _busybox_rootfs(rootfs)
    image = f"{layout}:{tag}"
    if not (layout / "index.json").exists():
        _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", image)
    _run("umoci", "insert", "--rootless", "--image", image, str(rootfs), "/")
    config = ["umoci", "config", "--image", image, "--config.workingdir", workdir]
    for arg in cmd:
        config += ["--config.cmd", arg]
    for arg in entrypoint:
        config += ["--config.entrypoint", arg]
    for item in env:
        config += ["--config.env", item]
    _run(*config)
    shutil.rmtree(rootfs)
    return f"oci:{image}"


def push_image(source: str, registry: str, repository: str) -> str:
    """Push an ``oci:`` image to a plain-HTTP registry; return the pushed reference."""
    reference = f"{registry}/{repository}"
    _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", source, f"docker://{reference}")
    return reference
