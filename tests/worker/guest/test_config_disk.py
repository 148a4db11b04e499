"""Config disk: shell quoting survives busybox ash, the ext4 holds what the init reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pytest

from worker.guest import (
    DEFAULT_HOME,
    DEFAULT_PATH,
    GuestConfig,
    GuestNetwork,
    GuestVolumeMount,
    build_config_disk,
    merge_env,
    render_config_sh,
    render_env_list,
    render_env_sh,
    shell_quote,
)
from worker.guest.config_disk import AGENT_ON_DISK
from worker.guest.initrd import DEFAULT_RUNNER

BUSYBOX = "/bin/busybox"

NASTY = [
    "",
    "plain",
    "it's",
    "''",
    "'\\''",
    'double "quotes"',
    "$HOME ${PATH} $(echo pwned) `echo pwned`",
    "line1\nline2\n",
    "back\\slash\\",
    "tab\there; rm -rf / &",
    "glob * ? [a-z]",
    "ünïcödé ✓",
    "trailing newline\n\n",
]


def _ash(script: str, *args: str) -> bytes:
    """Run ``script`` in busybox ash with an empty environment (as the guest init does)."""
    return subprocess.run(
        ["env", "-i", BUSYBOX, "sh", "-c", script, "sh", *args],
        check=True,
        capture_output=True,
    ).stdout


@pytest.mark.parametrize("value", NASTY)
def test_shell_quote_round_trips_through_ash(value: str) -> None:
    out = _ash(f"X={shell_quote(value)}; printf '%s' \"$X\"")
    assert out.decode() == value


def test_env_sh_exports_every_value_verbatim(tmp_path: Path) -> None:
    env = {f"V{i}": v for i, v in enumerate(NASTY)}
    env_sh = tmp_path / "env.sh"
    env_sh.write_text(render_env_sh(env))
    out = _ash('unset SHLVL PWD; . "$1"; exec /bin/busybox env -0', str(env_sh))
    seen = dict(item.split("=", 1) for item in out.decode().split("\0") if item)
    assert seen == {**env, "PATH": DEFAULT_PATH, "HOME": DEFAULT_HOME}


def test_env_list_is_the_same_environment_as_env_sh(tmp_path: Path) -> None:
    env = {f"V{i}": v for i, v in enumerate(NASTY)}
    data = render_env_list(env)
    assert data.endswith(b"\0")
    seen = dict(item.split("=", 1) for item in data.decode().split("\0") if item)
    assert seen == {**env, "PATH": DEFAULT_PATH, "HOME": DEFAULT_HOME}
    if not DEFAULT_RUNNER.is_file():
        pytest.skip("the init's helper is not built (scripts/install.sh)")
    # The helper gives a program exactly these variables, nothing of its own.
    env_list = tmp_path / "env.list"
    env_list.write_bytes(data)
    out = subprocess.run(
        [DEFAULT_RUNNER, "exec", "-e", env_list, "--", BUSYBOX, "env", "-0"],
        capture_output=True,
        check=True,
        env={"LEAK": "1"},
    ).stdout
    assert dict(item.split("=", 1) for item in out.decode().split("\0") if item) == seen


def test_env_sh_keeps_given_path_and_home() -> None:
    text = render_env_sh({"PATH": "/opt/bin", "HOME": "/home/app"})
    assert "export PATH='/opt/bin'\n" in text
    assert "export HOME='/home/app'\n" in text
    assert DEFAULT_PATH not in text


def test_argv_string_evals_to_the_exact_argv(tmp_path: Path) -> None:
    cfg = GuestConfig(entrypoint=("/bin/app", "--flag"), cmd=tuple(NASTY), workdir="/w'x")
    cfg_sh = tmp_path / "config.sh"
    cfg_sh.write_text(render_config_sh(cfg))
    out = _ash(
        '. "$1"; eval "set -- $VMFLEET_ARGV"; printf "%s\\0" "$VMFLEET_WORKDIR" "$@"',
        str(cfg_sh),
    )
    words = out.decode().split("\0")[:-1]
    assert words == ["/w'x", *cfg.argv]


def test_config_sh_carries_volumes_and_network(tmp_path: Path) -> None:
    cfg = GuestConfig(
        entrypoint=("/srv",),
        hostname="web-1",
        volume_mounts=(
            GuestVolumeMount(device="/dev/vdd", path="/data", mode="rw"),
            GuestVolumeMount(
                device="/dev/vde", path="/base", mode="overlay", overlay_device="/dev/vdf"
            ),
        ),
        network=GuestNetwork(
            enabled=True, ip="10.0.2.15", cidr=24, gw="10.0.2.2", dns=("1.1.1.1", "8.8.8.8")
        ),
    )
    cfg_sh = tmp_path / "config.sh"
    cfg_sh.write_text(render_config_sh(cfg))
    names = [
        "VMFLEET_HOSTNAME",
        "VMFLEET_NET_ENABLED",
        "VMFLEET_NET_MODE",
        "VMFLEET_NET_IP",
        "VMFLEET_NET_CIDR",
        "VMFLEET_NET_GW",
        "VMFLEET_NET_DNS",
        "VMFLEET_VOL_COUNT",
        "VMFLEET_VOL_1_DEVICE",
        "VMFLEET_VOL_1_PATH",
        "VMFLEET_VOL_1_MODE",
        "VMFLEET_VOL_1_OVERLAY",
        "VMFLEET_VOL_0_OVERLAY",
    ]
    script = '. "$1"; ' + " ".join(f'printf "%s\\0" "${n}";' for n in names)
    values = _ash(script, str(cfg_sh)).decode().split("\0")[:-1]
    assert values == [
        "web-1", "1", "static", "10.0.2.15", "24", "10.0.2.2", "1.1.1.1 8.8.8.8", "2",
        "/dev/vde", "/base", "overlay", "/dev/vdf", "",
    ]  # fmt: skip


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "", "é", "A=B", "X;rm"])
def test_invalid_env_key_is_rejected_by_name(key: str) -> None:
    with pytest.raises(ValueError, match="env key") as info:
        render_config_sh(GuestConfig(env={key: "v"}))
    assert repr(key) in str(info.value)


def test_nul_bytes_are_rejected() -> None:
    with pytest.raises(ValueError, match="NUL"):
        render_env_sh({"A": "x\0y"})
    with pytest.raises(ValueError, match="NUL"):
        render_config_sh(GuestConfig(cmd=("a\0b",)))


@pytest.mark.parametrize(
    "cfg",
    [
        GuestConfig(workdir="relative"),
        GuestConfig(volume_mounts=(GuestVolumeMount(device="/dev/sda", path="/d"),)),
        GuestConfig(volume_mounts=(GuestVolumeMount(device="/dev/vdd", path="d"),)),
        GuestConfig(
            volume_mounts=(GuestVolumeMount(device="/dev/vdd", path="/d", mode="overlay"),)
        ),
        GuestConfig(network=GuestNetwork(enabled=True, mode="static")),
        GuestConfig(network=GuestNetwork(enabled=True, ip="10.0.0.300", cidr=24)),
        GuestConfig(hostname="bad host"),
    ],
)
def test_invalid_configs_raise(cfg: GuestConfig) -> None:
    with pytest.raises(ValueError):
        render_config_sh(cfg)


def test_merge_env_instance_wins() -> None:
    image = ["PATH=/usr/bin", "LANG=C", "EMPTY=", "EQ=a=b"]
    merged = merge_env(image, {"LANG": "de_DE.UTF-8", "NEW": "1"})
    assert merged == {
        "PATH": "/usr/bin",
        "LANG": "de_DE.UTF-8",
        "EMPTY": "",
        "EQ": "a=b",
        "NEW": "1",
    }
    assert merge_env({"A": "1"}, None) == {"A": "1"}
    assert merge_env(None, {"A": "2"}) == {"A": "2"}
    with pytest.raises(ValueError):
        merge_env(["NOEQUALS"], None)


def _debugfs(image: Path, request: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], check=True, capture_output=True
    ).stdout


def _debugfs_cat(image: Path, name: str) -> bytes:
    return _debugfs(image, f"cat /{name}")


@pytest.mark.anyio
async def test_build_config_disk_writes_readable_ext4(tmp_path: Path) -> None:
    cfg = GuestConfig(
        entrypoint=("/bin/sh", "-c"),
        cmd=("echo \"$GREETING\" 'x'",),
        workdir="/app",
        env={"GREETING": "it's $x\n"},
    )
    image = tmp_path / "guests" / "i1" / "config.ext4"
    await build_config_disk(image, cfg)
    assert image.is_file()
    assert not list(image.parent.glob(".config-*")), "staging dir left behind"
    assert _debugfs_cat(image, "config.sh").decode() == render_config_sh(cfg)
    assert _debugfs_cat(image, "env.sh").decode() == render_env_sh(cfg.env)
    assert _debugfs_cat(image, "env.list") == render_env_list(cfg.env)
    decoded = msgspec.json.decode(_debugfs_cat(image, "config.json"), type=GuestConfig)
    assert decoded == cfg
    # Rebuilding over an existing disk replaces it.
    await build_config_disk(image, GuestConfig(cmd=("other",)))
    assert "'\\''other'\\''" in _debugfs_cat(image, "config.sh").decode()


@pytest.mark.anyio
async def test_the_agent_goes_on_the_config_disk_executable(tmp_path: Path) -> None:
    """The init runs the agent from the config disk (it is not in the initrd)."""
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF pretend agent" * 50_000)
    agent.chmod(0o755)
    image = tmp_path / "config.ext4"
    await build_config_disk(image, GuestConfig(cmd=("app",)), agent=agent)
    assert _debugfs_cat(image, AGENT_ON_DISK) == agent.read_bytes()
    assert "Mode:  0755" in _debugfs(image, f"stat /{AGENT_ON_DISK}").decode()
    # Without one, the disk holds the config alone.
    await build_config_disk(image, GuestConfig(cmd=("app",)))
    assert AGENT_ON_DISK not in _debugfs(image, "ls -p /").decode()
