"""Cloud Hypervisor's REST shapes (API v0.3.0, ``cloud-hypervisor.yaml``), as far as vmfleet
uses them.

Requests leave out every field vmfleet does not set (``omit_defaults``): CH applies its own
defaults to absent fields, and the spec allows no ``null`` anywhere. Responses are decoded
leniently (unknown fields skipped): CH's ``vm.info`` carries the whole VmConfig, of which
the driver reads two fields.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "ConsoleConfig",
    "CpusConfig",
    "DiskConfig",
    "MemoryConfig",
    "NetConfig",
    "PayloadConfig",
    "PciDeviceInfo",
    "RateLimiterConfig",
    "RestoreConfig",
    "TokenBucket",
    "VmConfig",
    "VmInfo",
    "VmRemoveDevice",
    "VmSnapshotConfig",
    "VmmPingResponse",
    "VsockConfig",
]


class _Request(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    pass


class PayloadConfig(_Request, frozen=True):
    kernel: str
    cmdline: str
    initramfs: str


class CpusConfig(_Request, frozen=True):
    boot_vcpus: int
    max_vcpus: int


class MemoryConfig(_Request, frozen=True):
    size: int


class TokenBucket(_Request, frozen=True):
    """``size`` tokens (bytes) refilled every ``refill_time`` ms, plus a one-time burst."""

    size: int
    refill_time: int
    one_time_burst: int | None = None


class RateLimiterConfig(_Request, frozen=True):
    bandwidth: TokenBucket


class DiskConfig(_Request, frozen=True):
    path: str
    readonly: bool = False
    id: str | None = None
    serial: str | None = None
    rate_limiter_config: RateLimiterConfig | None = None


class NetConfig(_Request, frozen=True):
    tap: str
    mac: str
    id: str | None = None


class ConsoleConfig(_Request, frozen=True):
    """A serial port or the virtio console: ``mode`` Off, Pty, Tty, File, Socket or Null."""

    mode: str
    file: str | None = None


class VsockConfig(_Request, frozen=True):
    """A virtio-vsock device whose host side is a unix socket (hybrid vsock)."""

    cid: int
    socket: str


class VmConfig(_Request, frozen=True):
    payload: PayloadConfig
    cpus: CpusConfig
    memory: MemoryConfig
    serial: ConsoleConfig
    console: ConsoleConfig
    disks: tuple[DiskConfig, ...] = ()
    net: tuple[NetConfig, ...] = ()
    vsock: VsockConfig | None = None


class VmSnapshotConfig(_Request, frozen=True):
    destination_url: str


class RestoreConfig(_Request, frozen=True):
    source_url: str
    #: No default, so it is always sent: vmfleet restores lazily, like hypeman.
    prefault: bool


class VmRemoveDevice(_Request, frozen=True):
    id: str


# -- responses -------------------------------------------------------------------------------


class VmmPingResponse(msgspec.Struct, kw_only=True):
    version: str
    pid: int | None = None


class PciDeviceInfo(msgspec.Struct, kw_only=True):
    id: str
    bdf: str


class _InfoConsole(msgspec.Struct, kw_only=True):
    mode: str
    #: For ``Pty``: the pty CH made (it fills this in at boot and restore).
    file: str | None = None


class _InfoConfig(msgspec.Struct, kw_only=True):
    console: _InfoConsole | None = None


class _DeviceNode(msgspec.Struct, kw_only=True):
    id: str | None = None


class VmInfo(msgspec.Struct, kw_only=True):
    state: str
    config: _InfoConfig
    device_tree: dict[str, _DeviceNode] | None = None
