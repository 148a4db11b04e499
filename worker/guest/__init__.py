"""Guest boot assets: the kernel (and its PVH vmlinux, what the VMMs boot), vmfleet's initrd
(busybox, modules, init.sh), the config disk (the instance's config and the guest agent)."""

from .config_disk import (
    DEFAULT_AGENT,
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
    validate_config,
)
from .errors import GuestAssetError
from .initrd import (
    INIT_SCRIPT,
    ensure_initrd,
    initrd_cache_key,
    parse_modules_dep,
    remove_stale_initrds,
    resolve_load_order,
)
from .kernel import (
    BOOT_ARGS,
    DEFAULT_KERNEL_PACKAGE,
    KernelAssets,
    ensure_kernel,
    read_bzimage_version,
)
from .vmlinux import boot_kernel, ensure_vmlinux

__all__ = [
    "BOOT_ARGS",
    "DEFAULT_AGENT",
    "DEFAULT_HOME",
    "DEFAULT_KERNEL_PACKAGE",
    "DEFAULT_PATH",
    "INIT_SCRIPT",
    "GuestAssetError",
    "GuestConfig",
    "GuestNetwork",
    "GuestVolumeMount",
    "KernelAssets",
    "boot_kernel",
    "build_config_disk",
    "ensure_initrd",
    "ensure_kernel",
    "ensure_vmlinux",
    "initrd_cache_key",
    "merge_env",
    "parse_modules_dep",
    "read_bzimage_version",
    "remove_stale_initrds",
    "render_config_sh",
    "render_env_list",
    "render_env_sh",
    "resolve_load_order",
    "shell_quote",
    "validate_config",
]
