"""The config disk (``/dev/vdc``): what the guest init needs to run one instance.

The disk is a small ext4 image holding these files:

``config.json``
    GuestConfig as JSON, for humans and tools.
``config.sh``
    The same facts as ash-sourceable assignments (the init has no JSON parser)::

        VMFLEET_ARGV=<entrypoint+cmd, each word single-quoted, space-joined, then quoted again>
        VMFLEET_ARGC='<number of words>'
        VMFLEET_WORKDIR='/app'
        VMFLEET_PATH='<the app PATH>'          # searched for argv[0] if the image lacks /bin/sh
        VMFLEET_HOSTNAME='name'                # may be empty
        VMFLEET_NET_ENABLED='0|1'
        VMFLEET_NET_MODE='static|dhcp'
        VMFLEET_NET_IP='10.0.2.15'  VMFLEET_NET_CIDR='24'  VMFLEET_NET_GW='10.0.2.2'
        VMFLEET_NET_DNS='1.1.1.1 8.8.8.8'      # space separated
        VMFLEET_VOL_COUNT='N'
        VMFLEET_VOL_<i>_DEVICE / _PATH / _MODE (rw|ro|overlay) / _OVERLAY (overlay device)

    Every value is single-quoted, ``'`` written as ``'\\''``, so nothing in a value is expanded.
``env.sh``
    The app's environment, one ``export KEY='value'`` per variable, plus PATH and HOME
    defaults when the config leaves them out.
``env.list``
    The same environment as ``KEY=value`` entries, each ended by a NUL: what the init's
    helper (``vmfleet-run exec -e``) gives the app and the agent, with no shell to start.
``vmfleet-agent``
    The guest agent (docs/agent-protocol.md), when the host has one. Here rather than in
    the initrd: the kernel unpacks the whole initrd into memory before the init starts,
    and the agent is run only after the app's start, read from this disk as it runs. That
    is safe because a running guest's config disk never changes under it: it is written
    only before a VMM boots, and a restore or a fork gets a copy of the saved VM's own.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import anyio
import msgspec

from ._run import run

__all__ = [
    "AGENT_ON_DISK",
    "DEFAULT_AGENT",
    "DEFAULT_HOME",
    "DEFAULT_PATH",
    "GuestConfig",
    "GuestNetwork",
    "GuestVolumeMount",
    "build_config_disk",
    "merge_env",
    "render_config_sh",
    "render_env_list",
    "render_env_sh",
    "shell_quote",
    "validate_config",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_HOME = "/root"

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A disk by name (/dev/vdX) or by its virtio serial (serial:NAME, at most 20 characters).
_DEVICE = re.compile(r"^(/dev/vd[a-z]{1,2}|serial:[A-Za-z0-9_-]{1,20})$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class GuestVolumeMount(msgspec.Struct, frozen=True, kw_only=True):
    device: str
    path: str
    mode: Literal["rw", "ro", "overlay"] = "rw"
    overlay_device: str | None = None


class GuestNetwork(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = False
    mode: Literal["static", "dhcp"] = "static"
    ip: str | None = None
    cidr: int | None = None
    gw: str | None = None
    dns: tuple[str, ...] = ()


class GuestConfig(msgspec.Struct, frozen=True, kw_only=True):
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = "/"
    env: dict[str, str] = msgspec.field(default_factory=dict)
    volume_mounts: tuple[GuestVolumeMount, ...] = ()
    network: GuestNetwork = msgspec.field(default_factory=GuestNetwork)
    hostname: str | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        return self.entrypoint + self.cmd


def merge_env(
    image_env: Mapping[str, str] | Iterable[str] | None,
    instance_env: Mapping[str, str] | None,
) -> dict[str, str]:
    """The image env overlaid with the instance env (instance wins).

    ``image_env`` may be the OCI config's ``["KEY=value", ...]`` list or a mapping.
    """
    merged: dict[str, str] = {}
    if isinstance(image_env, Mapping):
        merged.update(image_env)
    elif image_env is not None:
        for item in image_env:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"image env entry {item!r} has no '='")
            merged[key] = value
    if instance_env:
        merged.update(instance_env)
    return merged


def shell_quote(value: str) -> str:
    """Quote ``value`` for ash: single quotes, each ``'`` written as ``'\\''``."""
    return "'" + value.replace("'", "'\\''") + "'"


def _no_nul(what: str, value: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL byte")


def _check_ip(what: str, value: str | None) -> None:
    if value is None:
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IP address") from None


def validate_config(config: GuestConfig) -> None:
    """Raise ValueError naming the first field the guest could not receive intact."""
    for key, value in config.env.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"env key {key!r} is not a valid shell identifier")
        _no_nul(f"env {key}", value)
    for i, word in enumerate(config.argv):
        _no_nul(f"argv[{i}]", word)
    if not config.workdir.startswith("/"):
        raise ValueError(f"workdir {config.workdir!r} is not absolute")
    _no_nul("workdir", config.workdir)
    if config.hostname is not None and not _HOSTNAME.match(config.hostname):
        raise ValueError(f"hostname {config.hostname!r} is not a valid host name")
    seen: set[str] = set()
    for vol in config.volume_mounts:
        if not _DEVICE.match(vol.device):
            raise ValueError(f"volume device {vol.device!r} is not /dev/vdX or serial:NAME")
        if not vol.path.startswith("/") or "\n" in vol.path or "\0" in vol.path:
            raise ValueError(f"volume path {vol.path!r} is not a clean absolute path")
        if vol.path in seen:
            raise ValueError(f"volume path {vol.path!r} is mounted twice")
        seen.add(vol.path)
        if vol.mode == "overlay" and (
            vol.overlay_device is None or not _DEVICE.match(vol.overlay_device)
        ):
            raise ValueError(
                f"overlay volume at {vol.path!r} needs an overlay_device (/dev/vdX or serial:NAME)"
            )
    net = config.network
    if net.enabled and net.mode == "static":
        if net.ip is None or net.cidr is None:
            raise ValueError("static network needs ip and cidr")
        if not 0 <= net.cidr <= 128:
            raise ValueError(f"network cidr {net.cidr} is out of range")
    _check_ip("network ip", net.ip)
    _check_ip("network gw", net.gw)
    for server in net.dns:
        _check_ip("network dns", server)


def _assign(name: str, value: str | int | None) -> str:
    return f"{name}={shell_quote('' if value is None else str(value))}\n"


def render_config_sh(config: GuestConfig) -> str:
    """config.sh: the assignments the guest init sources (see the module docstring)."""
    validate_config(config)
    net = config.network
    argv = " ".join(shell_quote(word) for word in config.argv)
    out = ["# vmfleet guest config, generated by the host; sourced by /init\n"]
    out.append(_assign("VMFLEET_ARGV", argv))
    out.append(_assign("VMFLEET_ARGC", len(config.argv)))
    out.append(_assign("VMFLEET_WORKDIR", config.workdir))
    out.append(_assign("VMFLEET_PATH", config.env.get("PATH", DEFAULT_PATH)))
    out.append(_assign("VMFLEET_HOSTNAME", config.hostname))
    out.append(_assign("VMFLEET_NET_ENABLED", "1" if net.enabled else "0"))
    out.append(_assign("VMFLEET_NET_MODE", net.mode))
    out.append(_assign("VMFLEET_NET_IP", net.ip))
    out.append(_assign("VMFLEET_NET_CIDR", net.cidr))
    out.append(_assign("VMFLEET_NET_GW", net.gw))
    out.append(_assign("VMFLEET_NET_DNS", " ".join(net.dns)))
    out.append(_assign("VMFLEET_VOL_COUNT", len(config.volume_mounts)))
    for i, vol in enumerate(config.volume_mounts):
        out.append(_assign(f"VMFLEET_VOL_{i}_DEVICE", vol.device))
        out.append(_assign(f"VMFLEET_VOL_{i}_PATH", vol.path))
        out.append(_assign(f"VMFLEET_VOL_{i}_MODE", vol.mode))
        out.append(_assign(f"VMFLEET_VOL_{i}_OVERLAY", vol.overlay_device))
    return "".join(out)


def _app_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` checked, with PATH and HOME defaults when absent."""
    full = dict(env)
    full.setdefault("PATH", DEFAULT_PATH)
    full.setdefault("HOME", DEFAULT_HOME)
    for key, value in full.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"env key {key!r} is not a valid shell identifier")
        _no_nul(f"env {key}", value)
    return full


def render_env_sh(env: Mapping[str, str]) -> str:
    """env.sh: ``export KEY='value'`` lines, with PATH and HOME defaults when absent."""
    return "".join(f"export {k}={shell_quote(v)}\n" for k, v in _app_env(env).items())


def render_env_list(env: Mapping[str, str]) -> bytes:
    """env.list: ``KEY=value`` entries each ended by a NUL, the same variables as env.sh."""
    return b"".join(f"{k}={v}\0".encode() for k, v in _app_env(env).items())


#: Where scripts/install.sh builds the agent: the repository's git-ignored .cache/.
DEFAULT_AGENT = Path(__file__).resolve().parents[2] / ".cache" / "guest-agent" / "vmfleet-agent"
#: The agent's name on the config disk (the init runs it from there).
AGENT_ON_DISK = "vmfleet-agent"


def _put_agent(agent: Path, content: Path) -> int:
    """The agent into the disk's content (a hard link when it can be); its size."""
    target = content / AGENT_ON_DISK
    try:
        target.hardlink_to(agent)
    except OSError:
        shutil.copyfile(agent, target)
        target.chmod(0o755)
    return target.stat().st_size


def _disk_size(content_bytes: int) -> int:
    mib = 1 << 20
    want = 2 * content_bytes + mib
    return max(2 * mib, -(-want // mib) * mib)


async def build_config_disk(path: Path, config: GuestConfig, *, agent: Path | None = None) -> None:
    """Write ``path`` as an ext4 image with config.json, config.sh, env.sh and env.list at
    its root, and ``agent`` as ``vmfleet-agent`` when given.

    The image is built beside ``path`` and renamed into place; attach it read-only.
    """
    files = {
        "config.json": msgspec.json.format(msgspec.json.encode(config), indent=2) + b"\n",
        "config.sh": render_config_sh(config).encode(),
        "env.sh": render_env_sh(config.env).encode(),
        "env.list": render_env_list(config.env),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".config-", dir=path.parent))
    try:
        content = staging / "content"
        content.mkdir()
        for name, data in files.items():
            (content / name).write_bytes(data)
            (content / name).chmod(0o644)
        content_bytes = sum(len(d) for d in files.values())
        if agent is not None:
            content_bytes += await anyio.to_thread.run_sync(_put_agent, agent, content)
        image = staging / "config.ext4"
        size = _disk_size(content_bytes)
        with image.open("wb") as f:
            f.truncate(size)
        await run(
            [
                "mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "root_owner=0:0",
                "-L", "vmfleet-cfg", "-d", content, image,
            ]
        )  # fmt: skip
        image.replace(path)
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
