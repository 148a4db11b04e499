"""Fixtures for the Cloud Hypervisor driver: the API double on call, the real guest kernel."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.support.ch import DOUBLE_KNOBS, RequestLog, double_processes
from worker.guest import ensure_kernel
from worker.guest.vmlinux import ensure_vmlinux


@pytest.fixture(scope="session")
def ch_kernel(test_assets: Path) -> Path:
    """Debian's cloud bzImage; its PVH vmlinux is extracted beside it once per session."""

    async def prepare() -> Path:
        kernel = await ensure_kernel(test_assets)
        await ensure_vmlinux(kernel.bzimage)
        return kernel.bzimage

    return anyio.run(prepare)


@pytest.fixture
def ch_requests(monkeypatch: pytest.MonkeyPatch, vm_dir: Path) -> Iterator[RequestLog]:
    """The double's request log for this test. Afterwards: the spec refused none of them
    (unless the test meant it to), and no double is left running."""
    log = RequestLog(vm_dir / "ch-requests.jsonl")
    monkeypatch.setenv("CH_DOUBLE_PYTHON", sys.executable)
    monkeypatch.setenv("CH_DOUBLE_LOG", str(log.path))
    for knob in DOUBLE_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    yield log
    assert double_processes() == [], "a Cloud Hypervisor double was left running"
    if not log.refusals_expected:
        assert log.refused() == [], "the driver sent requests the spec does not allow"


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    # Short on purpose: unix socket paths under it must stay within 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="ch", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
