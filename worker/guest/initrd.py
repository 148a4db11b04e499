"""vmfleet's initrd: busybox-static, the kernel's virtio/overlay modules, init.sh as /init
and the init's helper (built from guest-run/ by scripts/install.sh).

The guest agent is not in it: every byte of an initrd is unpacked into memory before the
init starts (~25 ms per MiB under emulation), and the agent is needed only after the app's
start. It comes on each VM's config disk instead (worker.guest.config_disk).

The image is an uncompressed newc cpio written directly by this module (no staging tree, no
root-only mknod), cached as ``<data_dir>/system/initrd/<key>/initrd.img``. ``key`` is a sha256
over every input: init.sh, the helper scripts, the busybox binary, the kernel version, each
module file that goes in and the helper. Inputs unchanged means the cached file is
returned untouched.

Inside the initrd:

    /init                       init.sh (busybox ash, PID 1)
    /bin/busybox + applet links (from ``busybox --list-full`` at build time)
    /bin/vmfleet-run            the init's helper, when it was built: mounts, loads modules,
                                starts the app and sets up the network with one process each
                                (guest-run/vmfleet-run.c)
    /lib/modules/<ver>/...      the modules, uncompressed and without their signatures,
                                at their modules.dep paths
    /lib/modules/<ver>/modules.dep  their dependencies (only theirs), for busybox's modprobe
                                in an initrd without the helper (no /sbin/modprobe link:
                                _KERNEL_MODPROBE says why)
    /etc/vmfleet/modules        absolute module paths in load order, one per line
    /etc/vmfleet/module-devices ``<when> <name> <path>``: which modules the init loads for
                                which device (MODULE_DEVICES), dependencies first
    /etc/acpi/PWRF/00000080     ACPI power button handler -> ``/init --shutdown``
    /usr/share/udhcpc/default.script -> ``/init --udhcpc``
    /etc/vmfleet/fstab.*        what the init mounts at each step, with one process each
    /etc/vmfleet/dev/           the /dev links (fd, stdin, stdout, stderr) it makes
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio

from ._run import run
from .errors import GuestAssetError
from .kernel import KernelAssets

__all__ = [
    "DEFAULT_BUSYBOX",
    "DEFAULT_RUNNER",
    "INIT_SCRIPT",
    "MODULE_DEVICES",
    "OPTIONAL_MODULES",
    "OVERLAY_ROOT_DIRS",
    "REQUIRED_MODULES",
    "ensure_initrd",
    "initrd_cache_key",
    "initrd_dir",
    "module_name",
    "parse_modules_dep",
    "parse_softdeps",
    "remove_stale_initrds",
    "resolve_load_order",
    "strip_signature",
]

# Bump when the layout written by _entries() changes, so cached images are rebuilt.
_FORMAT = b"vmfleet-initrd-v5"

DEFAULT_BUSYBOX = Path("/bin/busybox")
#: Where scripts/install.sh builds the init's helper (guest-run/vmfleet-run.c).
DEFAULT_RUNNER = Path(__file__).resolve().parents[2] / ".cache" / "guest-run" / "vmfleet-run"
_RUNNER_IN_GUEST = "bin/vmfleet-run"
_APP_STARTED_FIFO = "etc/vmfleet/app-started"

# Module names (modules.dep names, '-' folded to '_'). Dependencies are pulled in from
# modules.dep; built-in ones (modules.builtin) are skipped.
REQUIRED_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "overlay")
OPTIONAL_MODULES: tuple[str, ...] = (
    "virtio_net",  # + failover, net_failover
    "virtio_rng",
    "virtio_console",  # the control channel (CH) and the agent's port (QEMU)
    "vmw_vsock_virtio_transport",  # the agent's channel under Cloud Hypervisor (+ vsock)
    "button",  # ACPI power button -> acpid -> graceful shutdown (a fallback: see init.sh)
    "evdev",
)

#: When the init loads each module: ``boot`` always, a virtio PCI device id (transitional
#: and modern) only when its VM has such a device, ``acpi`` in the background, for acpid.
#: Written to /etc/vmfleet/module-devices for the names that are modules of this kernel.
MODULE_DEVICES: dict[str, tuple[str, ...]] = {
    "virtio_pci": ("boot",),
    "virtio_blk": ("boot",),
    "overlay": ("boot",),
    "virtio_net": ("0x1000", "0x1041"),
    "virtio_console": ("0x1003", "0x1043"),
    "virtio_rng": ("0x1005", "0x1044"),
    "vmw_vsock_virtio_transport": ("0x1053",),
    "button": ("acpi",),
    "evdev": ("acpi",),
}

_HELPERS: dict[str, bytes] = {
    "etc/acpi/PWRF/00000080": b"#!/bin/sh\nexec /init --shutdown 10\n",
    "usr/share/udhcpc/default.script": b'#!/bin/sh\nexec /init --udhcpc "$@"\n',
}

#: What the host makes in a new overlay disk (path: mode) so that the init mounts the whole
#: root in one step (fstab.root): the overlay's upper layer and work directory, and in the
#: upper layer the mount points of /proc, /sys and /dev, which not every image has (an
#: image's own are merged with these; their contents are covered by the mounts anyway).
OVERLAY_ROOT_DIRS: dict[str, int] = {
    "upper": 0o755,
    "work": 0o755,
    "upper/proc": 0o555,
    "upper/sys": 0o555,
    "upper/dev": 0o755,
}

_FSTAB_DISKS = (
    b"/dev/vda /lower ext4 ro,noload 0 0\n"
    b"/dev/vdb /overlay ext4 noinit_itable 0 0\n"
    b"/dev/vdc /cfg ext4 ro,noload 0 0\n"
)
_FSTAB_OVERLAY = (
    b"overlay /newroot overlay lowerdir=/lower,upperdir=/overlay/upper,workdir=/overlay/work 0 0\n"
)
_FSTAB_BIND = (
    b"/proc /newroot/proc none rbind 0 0\n"
    b"/sys /newroot/sys none rbind 0 0\n"
    b"/dev /newroot/dev none rbind 0 0\n"
)

#: What init.sh mounts, one process per step (the helper's ``mount``, else busybox's
#: ``mount -a -T``), and the /dev links it makes: each process costs the boot milliseconds
#: under emulation.
_FILES: dict[str, bytes] = {
    "etc/vmfleet/fstab.sys": (
        b"proc /proc proc defaults 0 0\n"
        b"sysfs /sys sysfs defaults 0 0\n"
        b"devtmpfs /dev devtmpfs defaults 0 0\n"
    ),
    "etc/vmfleet/fstab.dev": (
        b"devpts /dev/pts devpts gid=5,mode=620,ptmxmode=666 0 0\n"
        b"shm /dev/shm tmpfs mode=1777,nosuid,nodev 0 0\n"
    ),
    # The image read-only, the overlay disk, the config disk (the overlay root comes after).
    # The overlay disk is made with lazy inode tables; zeroing them in the background
    # (only a help to fsck) would take the guest's CPU and disk during the boot.
    "etc/vmfleet/fstab.disks": _FSTAB_DISKS,
    "etc/vmfleet/fstab.bind": _FSTAB_BIND,
    # All of the root at once, when the overlay disk has its layer's directories already
    # (OVERLAY_ROOT_DIRS, made by the host): one process instead of four.
    "etc/vmfleet/fstab.overlay": _FSTAB_OVERLAY,
    "etc/vmfleet/fstab.root": _FSTAB_DISKS + _FSTAB_OVERLAY + _FSTAB_BIND,
}
_DEV_LINKS: dict[str, str] = {
    "etc/vmfleet/dev/fd": "/proc/self/fd",
    "etc/vmfleet/dev/stdin": "/proc/self/fd/0",
    "etc/vmfleet/dev/stdout": "/proc/self/fd/1",
    "etc/vmfleet/dev/stderr": "/proc/self/fd/2",
}

_DIRS = (
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/share", "usr/share/udhcpc",
    "dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc", "etc/vmfleet", "etc/acpi",
    "etc/acpi/PWRF", "lower", "overlay", "newroot", "cfg", "lib", "lib/modules", "var",
    "var/log", "var/run", "run/vmfleet", "etc/vmfleet/dev",
)  # fmt: skip


#: Where the kernel runs modprobe to load a module it wants by name (CONFIG_MODPROBE_PATH).
#: No busybox link goes there: the boot's crypto self-tests ask for modules this initrd does
#: not hold, and each ask started a busybox modprobe (~40 ms of every boot under emulation,
#: before the init). The init loads the modules its VM needs itself (load_modules).
_KERNEL_MODPROBE = frozenset({"sbin/modprobe"})

INIT_SCRIPT = Path(__file__).with_name("init.sh")


def initrd_dir(data_dir: Path) -> Path:
    return data_dir / "system" / "initrd"


# --- module dependency resolution -------------------------------------------------------------


def module_name(path: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep -> {module path: [dependency paths]} (paths relative to lib/modules/<ver>)."""
    deps: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        mod, sep, rest = line.partition(":")
        if not sep:
            continue
        deps[mod.strip()] = rest.split()
    return deps


def parse_softdeps(text: str) -> dict[str, list[str]]:
    """modules.softdep -> {module name: [names to load before it]} (``pre:`` entries only)."""
    pre: dict[str, list[str]] = {}
    for raw in text.splitlines():
        words = raw.split()
        if len(words) < 3 or words[0] != "softdep":
            continue
        name, section = words[1].replace("-", "_"), ""
        for word in words[2:]:
            if word.endswith(":"):
                section = word[:-1]
            elif section == "pre":
                pre.setdefault(name, []).append(word.replace("-", "_"))
    return pre


def resolve_load_order(
    deps: Mapping[str, Sequence[str]],
    wanted: Iterable[str],
    *,
    optional: Iterable[str] = (),
    builtin: Iterable[str] = (),
    softdeps: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Module paths to insmod, each after everything it depends on.

    ``wanted`` names must exist (as a module or built in) or GuestAssetError is raised;
    ``optional`` names are skipped when absent. Soft ``pre:`` dependencies are loaded
    first when they exist.
    """
    by_name = {module_name(path): path for path in deps}
    builtin_names = {module_name(b) for b in builtin}
    soft = softdeps or {}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in done:
            return
        if path in visiting:
            raise GuestAssetError(f"dependency cycle through {path}")
        visiting.add(path)
        for pre in soft.get(module_name(path), ()):
            if pre in by_name:
                visit(by_name[pre])
        for dep in deps.get(path, ()):
            visit(dep)
        visiting.discard(path)
        done.add(path)
        order.append(path)

    for name, required in [(n, True) for n in wanted] + [(n, False) for n in optional]:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin_names and required:
            raise GuestAssetError(f"kernel module {name} is neither a module nor built in")
    return order


# --- cpio (newc) writer -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _write_cpio(out: BinaryIO, entries: Iterable[_Entry]) -> None:
    """Write ``entries`` as a newc archive: owner root, mtime 0, one inode each."""
    trailer = _Entry("TRAILER!!!", 0)
    for ino, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            0 if entry is trailer else ino,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            len(entry.data),
            0,  # dev major
            0,  # dev minor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name + _pad(len(header) + len(name)))
        out.write(entry.data + _pad(len(entry.data)))


# --- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Inputs:
    init: bytes
    busybox: bytes
    applets: tuple[str, ...]
    version: str
    modules: tuple[tuple[str, Path], ...]  # (path relative to lib/modules/<ver>, host file)
    runner: bytes | None = None
    #: modules.dep's lines of the modules that go in (paths relative to lib/modules/<ver>).
    deps: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def key(self) -> str:
        h = hashlib.sha256()
        runner = b"no-runner" if self.runner is None else b"runner:" + self.runner
        for part in (_FORMAT, self.init, self.busybox, self.version.encode(), runner):
            h.update(len(part).to_bytes(8, "little") + part)
        for rel, host in self.modules:
            h.update(rel.encode() + b"\0" + hashlib.sha256(host.read_bytes()).digest())
        h.update(_modules_dep(self.deps))
        for name, data in sorted({**_HELPERS, **_FILES}.items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        for name, target in sorted(_DEV_LINKS.items()):
            h.update(f"{name}\0{target}\0".encode())
        return h.hexdigest()


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return data


#: What the kernel's sign-file appends to a module: the signature, a 12-byte
#: ``struct module_signature`` (its last 4 bytes the signature's length, big-endian), this.
_SIGNATURE_MAGIC = b"~Module signature appended~\n"


def strip_signature(module: bytes) -> bytes:
    """``module`` without its appended signature (unchanged when it has none).

    The kernel checks a signature it finds (hashing the module and verifying RSA, slow under
    emulation: ~40 ms of a boot for the modules loaded), and an unsigned module only marks
    the kernel tainted unless signatures are enforced (``module.sig_enforce``, which
    vmfleet's command line does not set). The initrd itself is the host's trusted input.
    """
    if not module.endswith(_SIGNATURE_MAGIC) or len(module) < len(_SIGNATURE_MAGIC) + 12:
        return module
    info_end = len(module) - len(_SIGNATURE_MAGIC)
    sig_len = int.from_bytes(module[info_end - 4 : info_end], "big")
    body_end = info_end - 12 - sig_len
    return module[:body_end] if body_end > 0 else module


def _stored_rel(rel: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(".ko" + suffix):
            return rel[: -len(suffix)]
    return rel


def _module_devices(inputs: _Inputs) -> bytes:
    """``<when> <name> <path>`` lines for the modules that went in (see MODULE_DEVICES):
    under each ``<when>`` its modules and their dependencies, each once and after what it
    needs, so that the init's helper loads a device's modules by reading this file alone."""
    deps = {rel: list(needs) for rel, needs in inputs.deps}
    present = {module_name(rel) for rel, _ in inputs.modules}
    names_by_when: dict[str, list[str]] = {}
    for name, whens in MODULE_DEVICES.items():
        if name in present:
            for when in whens:
                names_by_when.setdefault(when, []).append(name)
    return "".join(
        f"{when} {module_name(rel)} /lib/modules/{inputs.version}/{_stored_rel(rel)}\n"
        for when, names in names_by_when.items()
        for rel in resolve_load_order(deps, names)
    ).encode()


def _modules_dep(deps: Iterable[tuple[str, Sequence[str]]]) -> bytes:
    """A modules.dep for the stored (uncompressed) modules: what busybox modprobe reads."""
    lines = (
        f"{_stored_rel(mod)}: {' '.join(_stored_rel(d) for d in needs)}".rstrip() + "\n"
        for mod, needs in deps
    )
    return "".join(lines).encode()


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def _entries(inputs: _Inputs, module_data: Mapping[str, bytes]) -> list[_Entry]:
    dirs: list[str] = list(_DIRS)
    files: list[_Entry] = []
    mod_base = f"lib/modules/{inputs.version}"
    load_order = []
    for rel, _ in inputs.modules:
        stored = f"{mod_base}/{_stored_rel(rel)}"
        dirs.extend(_parents(stored))
        files.append(_Entry(stored, stat.S_IFREG | 0o644, module_data[rel]))
        load_order.append("/" + stored)
    files.append(_Entry("init", stat.S_IFREG | 0o755, inputs.init))
    files.append(_Entry("bin/busybox", stat.S_IFREG | 0o755, inputs.busybox))
    if inputs.runner is not None:
        files.append(_Entry(_RUNNER_IN_GUEST, stat.S_IFREG | 0o755, inputs.runner))
    files.append(
        _Entry(
            "etc/vmfleet/modules",
            stat.S_IFREG | 0o644,
            "".join(f"{p}\n" for p in load_order).encode(),
        )
    )
    files.append(_Entry("etc/vmfleet/kernel", stat.S_IFREG | 0o644, f"{inputs.version}\n".encode()))
    if inputs.modules:
        dep = _modules_dep(inputs.deps)
        files.append(_Entry(f"{mod_base}/modules.dep", stat.S_IFREG | 0o644, dep))
        devices = _module_devices(inputs)
        files.append(_Entry("etc/vmfleet/module-devices", stat.S_IFREG | 0o644, devices))
    for name, data in _HELPERS.items():
        files.append(_Entry(name, stat.S_IFREG | 0o755, data))
    for name, data in _FILES.items():
        files.append(_Entry(name, stat.S_IFREG | 0o644, data))
    for name, target in _DEV_LINKS.items():
        files.append(_Entry(name, stat.S_IFLNK | 0o777, target.encode()))
    links = []
    taken = {f.name for f in files} | _KERNEL_MODPROBE
    for applet in inputs.applets:
        rel = applet.strip("/")
        if rel and rel not in taken:
            taken.add(rel)
            dirs.extend(_parents(rel))
            links.append(_Entry(rel, stat.S_IFLNK | 0o777, b"/bin/busybox"))
    nodes = [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        # The init reads it until the app's program runs (vmfleet-run exec -n): made here,
        # so the boot does not start a mkfifo for it.
        _Entry(_APP_STARTED_FIFO, stat.S_IFIFO | 0o600),
    ]
    unique_dirs = sorted(set(dirs), key=lambda d: (d.count("/"), d))
    return [
        *(_Entry(d, stat.S_IFDIR | 0o755) for d in unique_dirs),
        *nodes,
        *files,
        *links,
    ]


_ModuleList = tuple[tuple[tuple[str, Path], ...], tuple[tuple[str, tuple[str, ...]], ...]]


async def _module_list(kernel: KernelAssets) -> _ModuleList:
    """The modules that go in, in load order, and their modules.dep lines."""
    root = kernel.modules_root
    if root is None:
        return (), ()
    dep_file = root / "modules.dep"
    if not dep_file.is_file():
        if root.parent.name != "modules" or root.parent.parent.name != "lib":
            raise GuestAssetError(f"{root} has no modules.dep and is not under lib/modules/")
        await run(["depmod", "-b", root.parent.parent.parent, kernel.version])
    deps = parse_modules_dep(dep_file.read_text())
    builtin_file = root / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    soft_file = root / "modules.softdep"
    soft = parse_softdeps(soft_file.read_text()) if soft_file.is_file() else {}
    order = resolve_load_order(
        deps, REQUIRED_MODULES, optional=OPTIONAL_MODULES, builtin=builtin, softdeps=soft
    )
    return tuple((rel, root / rel) for rel in order), tuple(
        (rel, tuple(deps[rel])) for rel in order
    )


async def _applets(busybox: Path) -> tuple[str, ...]:
    out = await run([busybox, "--list-full"])
    return tuple(line for line in out.decode().split() if line)


def _optional_file(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None and path.is_file() else None


async def _collect(
    kernel: KernelAssets, busybox: Path, init: bytes, runner: Path | None
) -> _Inputs:
    if not busybox.is_file():
        raise GuestAssetError(f"busybox binary {busybox} not found (install busybox-static)")
    modules, deps = await _module_list(kernel)
    return _Inputs(
        init=init,
        busybox=busybox.read_bytes(),
        applets=await _applets(busybox),
        version=kernel.version,
        modules=modules,
        runner=_optional_file(runner),
        deps=deps,
    )


async def initrd_cache_key(
    kernel: KernelAssets,
    *,
    busybox: Path = DEFAULT_BUSYBOX,
    init_script: bytes | None = None,
    runner: Path | None = DEFAULT_RUNNER,
) -> str:
    """The cache key ensure_initrd would use for these inputs."""
    inputs = await _collect(
        kernel,
        busybox,
        INIT_SCRIPT.read_bytes() if init_script is None else init_script,
        runner,
    )
    return await anyio.to_thread.run_sync(inputs.key)


async def _module_bytes(modules: Sequence[tuple[str, Path]]) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    for rel, host in modules:
        if host.name.endswith(".ko.zst"):
            module = await run(["zstd", "-dc", host])
        else:
            module = await anyio.to_thread.run_sync(_decompress, host)
        data[rel] = strip_signature(module)
    return data


def _write_image(target: Path, entries: list[_Entry]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".initrd-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_cpio(out, entries)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def ensure_initrd(
    data_dir: Path,
    kernel: KernelAssets,
    *,
    busybox: Path = DEFAULT_BUSYBOX,
    init_script: bytes | None = None,
    runner: Path | None = DEFAULT_RUNNER,
) -> Path:
    """The initrd for ``kernel``, built on first use and whenever an input changes.

    ``runner``: the init's helper; a missing file (or None) makes an initrd without one
    (the init then starts the app with busybox alone, more slowly). An operator initrd
    (``kernel.initrd``) is returned as it is.
    """
    if kernel.initrd is not None:
        return kernel.initrd
    inputs = await _collect(
        kernel,
        busybox,
        INIT_SCRIPT.read_bytes() if init_script is None else init_script,
        runner,
    )
    key = await anyio.to_thread.run_sync(inputs.key)
    target = initrd_dir(data_dir) / key / "initrd.img"
    if target.is_file():
        return target
    module_data = await _module_bytes(inputs.modules)
    entries = _entries(inputs, module_data)
    await anyio.to_thread.run_sync(_write_image, target, entries)
    return target


def remove_stale_initrds(data_dir: Path, keep: Path) -> None:
    """Delete cached initrds other than ``keep`` (its parent directory)."""
    base = initrd_dir(data_dir)
    if not base.is_dir():
        return
    for d in base.iterdir():
        if d.is_dir() and d != keep.parent:
            shutil.rmtree(d, ignore_errors=True)
