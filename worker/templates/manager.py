"""The host's warm templates: which exist, which are wanted, and the one task that builds
them in the background.

- At start: builds of a killed worker (and their VMMs) and templates of another kernel,
  initrd or VMM are removed; then the default shape is built.
- A create of a shape without a template boots cold and asks for one (:meth:`want`), so
  the next create of that shape starts warm.
- One build at a time, in the worker's task group; cancelled with it (the build's VMM is
  killed and its directory removed). Builds stay within ``budget_bytes`` of disk: least
  recently used templates make room, and a shape that does not fit is not built.
- A failed build is logged and not retried for that shape until the worker restarts (a
  broken kernel would otherwise boot a VM in a loop); cold boots go on as before.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import anyio

from worker.drivers.base import Hypervisor
from worker.lifecycle.context import BootAssets
from worker.proc import VmmProcess, find_vmms
from worker.templates.build import TemplateBuildError, build_template
from worker.templates.store import (
    HostIdentity,
    Template,
    TemplateShape,
    TemplateStore,
    file_digest,
)

__all__ = ["DEFAULT_SHAPE", "TemplateManager"]

log = logging.getLogger(__name__)

#: What a create that names no size, vCPUs or network gets (gateway/plan.py's defaults).
DEFAULT_SHAPE = TemplateShape(memory_bytes=1 << 30, vcpus=2, network=True)
#: Before the first build: how much disk a template is taken to need (a QEMU memory image
#: holds the pages the guest touched, ~100 MB for a guest waiting in its initrd).
FIRST_ESTIMATE_BYTES = 256 << 20


class TemplateManager:
    def __init__(
        self,
        root: Path,
        driver: Hypervisor,
        boot: BootAssets,
        *,
        budget_bytes: int,
        vmm_binary: str | None,
        shapes: tuple[TemplateShape, ...] = (DEFAULT_SHAPE,),
    ) -> None:
        self.store = TemplateStore(root)
        self.driver = driver
        self.boot = boot
        self.budget_bytes = budget_bytes
        self.vmm_binary = vmm_binary
        self.host: HostIdentity | None = None
        self._wanted: list[TemplateShape] = list(shapes)
        self._failed: set[TemplateShape] = set()
        self._wake = anyio.Event()
        #: Set after every build attempt (tests and benchmarks wait on it).
        self.built = anyio.Event()

    # -- what creates ask ------------------------------------------------------------------

    def ready_for(self, shape: TemplateShape) -> Template | None:
        """The current template of ``shape``, or None (no identity yet, none built, or the
        kernel/initrd changed since: then a new one is asked for)."""
        if self.host is None:
            return None
        current = self._current_identity(self.host)
        if current != self.host:
            log.info("the guest kernel or initrd changed: templates are rebuilt")
            self.host = current
            self._failed.clear()
        template = self.store.find(shape, self.host)
        if template is None:
            self.want(shape)
            return None
        self.store.mark_used(template)
        return template

    def want(self, shape: TemplateShape) -> None:
        if shape in self._failed or shape in self._wanted:
            return
        self._wanted.append(shape)
        self._wake.set()

    # -- the builder -----------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: sweep, then build what is wanted, one at a time."""
        self.host = await self._identity()
        await self._sweep()
        while True:
            while self._wanted:
                shape = self._wanted.pop(0)
                await self._build(shape)
            self._wake = anyio.Event()
            if not self._wanted:
                await self._wake.wait()

    async def ensure(self, shape: TemplateShape) -> Template | None:
        """``shape``'s template, built now if there is none (tests and benchmarks; a worker
        builds in :meth:`run`, never both at once)."""
        if self.host is None:
            self.host = await self._identity()
            await self._sweep()
        await self._build(shape)
        return self.store.find(shape, self.host)

    async def _build(self, shape: TemplateShape) -> None:
        assert self.host is not None
        if self.store.find(shape, self.host) is not None:
            return
        needed = self._estimate()
        if not self.store.evict_for(needed, self.budget_bytes):
            log.warning(
                "template for %s not built: about %d MiB needed, disk budget %d MiB",
                _describe(shape),
                needed >> 20,
                self.budget_bytes >> 20,
            )
            self._failed.add(shape)
            return
        log.info("building a warm template for %s", _describe(shape))
        try:
            manifest = await build_template(self.store, self.driver, self.boot, shape, self.host)
        except TemplateBuildError as exc:
            log.error("warm template for %s failed; cold boots go on: %s", _describe(shape), exc)
            self._failed.add(shape)
        except Exception:  # a bug here must not take the worker down: creates boot cold
            log.exception("warm template for %s failed; cold boots go on", _describe(shape))
            self._failed.add(shape)
        else:
            log.info(
                "warm template %s for %s ready in %.1fs (%d MiB)",
                manifest.key,
                _describe(shape),
                manifest.build_seconds,
                manifest.size_bytes >> 20,
            )
            if self.store.used_bytes() > self.budget_bytes:
                self.store.evict_for(0, self.budget_bytes, keep=manifest.key)
        finally:
            self.built.set()
            self.built = anyio.Event()

    def _estimate(self) -> int:
        sizes = [m.size_bytes for m in self.store.complete()]
        return max(sizes) if sizes else FIRST_ESTIMATE_BYTES

    async def _sweep(self) -> None:
        """Kill the VMMs of builds a killed worker left, then remove what is stale."""
        root = self.store.root
        for pid in find_vmms(root):
            process = VmmProcess.adopt(pid, cmdline_must_contain=f"{root}/")
            if process is not None:
                log.info("killing the VMM (pid %d) of an unfinished template build", pid)
                await process.kill_and_reap()
        assert self.host is not None
        self.store.sweep(self.host)

    async def _identity(self) -> HostIdentity:
        version = await _vmm_version(self.vmm_binary)
        return await anyio.to_thread.run_sync(self._identity_now, version)

    def _identity_now(self, vmm_version: str) -> HostIdentity:
        return HostIdentity(
            kernel=str(self.boot.kernel),
            kernel_sha256=file_digest(self.boot.kernel),
            initrd=str(self.boot.initrd),
            initrd_sha256=file_digest(self.boot.initrd),
            vmm=self.driver.name,
            vmm_version=vmm_version,
            accel=self.boot.accel,
        )

    def _current_identity(self, host: HostIdentity) -> HostIdentity:
        try:
            return self._identity_now(host.vmm_version)
        except OSError:
            return host  # the files are being replaced; the next create looks again


async def _vmm_version(binary: str | None) -> str:
    if binary is None:
        return "unknown"
    try:
        result = await anyio.run_process([binary, "--version"], check=False)
    except OSError:
        return "unknown"
    lines = result.stdout.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else "unknown"


def _describe(shape: TemplateShape) -> str:
    mib = math.ceil(shape.memory_bytes / (1 << 20))
    net = "network" if shape.network else "no network"
    return f"{mib} MiB, {shape.vcpus} vCPU, {net}"
