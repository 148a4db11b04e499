"""Volumes: empty or from a tar.gz archive, with hypeman's safety rules; delete refused
while attached."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from schemas.errors import BadRequest, Conflict
from worker.volumes import VolumeStore

pytestmark = pytest.mark.anyio


def make_archive(
    path: Path, members: dict[str, bytes], *, links: dict[str, str] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def read_file(disk: Path, name: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", f"cat {name}", str(disk)], capture_output=True, text=True, check=True
    )
    return done.stdout


async def test_volume_from_archive_holds_its_files(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path, "h1")
    archive = make_archive(tmp_path / "a.tar.gz", {"hello.txt": b"hi\n", "dir/deep.txt": b"deep\n"})
    record = await store.create_from_archive("vol-a", "data", 2, archive)
    assert (record.size_gb, record.host) == (1, "h1")
    disk = store.data_path("vol-a")
    assert read_file(disk, "hello.txt") == "hi\n"
    assert read_file(disk, "dir/deep.txt") == "deep\n"


@pytest.mark.parametrize(
    ("members", "links", "code"),
    [
        ({"/etc/passwd": b"x"}, None, "invalid_archive"),
        ({"../escape.txt": b"x"}, None, "invalid_archive"),
        ({}, {"link": "/etc/shadow"}, "invalid_archive"),
        ({"big.bin": b"x" * 2048}, None, "archive_too_large"),
    ],
)
async def test_unsafe_archives_are_refused_and_leave_nothing(
    tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None, code: str
) -> None:
    store = VolumeStore(tmp_path, "h1")
    archive = make_archive(tmp_path / "bad.tar.gz", members, links=links)
    with pytest.raises(BadRequest) as info:
        await store.create_from_archive("vol-b", "bad", 1, archive, content_limit=1024)
    assert info.value.code == code
    assert store.get("vol-b") is None
    assert not (tmp_path / "volumes" / "vol-b").exists()
    assert [p.name for p in (tmp_path / "volumes").iterdir()] == []


async def test_not_a_gzip_is_refused(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path, "h1")
    (tmp_path / "x.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BadRequest, match=r"not a valid tar\.gz"):
        await store.create_from_archive("vol-c", "c", 1, tmp_path / "x.tar.gz")


async def test_attached_volume_cannot_be_deleted(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path, "h1")
    await store.create("vol-d", "d", 1)
    store.attach("vol-d", "inst-1", "/data", readonly=False)
    with pytest.raises(Conflict, match="in use"):
        store.delete("vol-d")
    with pytest.raises(Conflict):
        store.attach("vol-d", "inst-2", "/data", readonly=True)
    store.detach("vol-d", "inst-1")
    store.delete("vol-d")
    assert store.get("vol-d") is None


async def test_duplicate_id_is_a_conflict(tmp_path: Path) -> None:
    store = VolumeStore(tmp_path, "h1")
    await store.create("vol-e", "e", 1)
    with pytest.raises(Conflict) as info:
        await store.create("vol-e", "e", 1)
    assert info.value.code == "already_exists"
