"""The instance's own disks (worker/storage.py): what the guest finds on a new overlay."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from worker.guest.initrd import OVERLAY_ROOT_DIRS
from worker.storage import make_sparse_ext4

pytestmark = pytest.mark.anyio


def debugfs(disk: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(disk)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the directories are made by a root worker only")
async def test_a_new_overlay_has_the_roots_directories_owned_by_root(tmp_path: Path) -> None:
    """The init then mounts the whole root in one step (fstab.root)."""
    disk = tmp_path / "overlay.raw"
    await make_sparse_ext4(disk, 1 << 30, dirs=OVERLAY_ROOT_DIRS)
    assert disk.stat().st_blocks * 512 < 64 << 20  # still sparse
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    for path, mode in OVERLAY_ROOT_DIRS.items():
        stat = debugfs(disk, f"stat /{path}")
        assert "Type: directory" in stat, path
        assert f"Mode:  {mode:04o}" in stat, (path, stat.splitlines()[:3])
        assert "User:     0   Group:     0" in stat, path


async def test_an_overlay_without_directories_is_empty(tmp_path: Path) -> None:
    disk = tmp_path / "plain.raw"
    await make_sparse_ext4(disk, 64 << 20)
    names = [line.split("/")[5] for line in debugfs(disk, "ls -p /").splitlines() if line]
    assert names == [".", "..", "lost+found"]
