"""QEMU's command line is a function of the VM spec alone (so restore can rebuild it)."""

from __future__ import annotations

import json

from worker.drivers.base import DiskSpec, VmSpec
from worker.drivers.qemu import build_args


def spec(**changes: object) -> VmSpec:
    values: dict[str, object] = {
        "instance_id": "abc",
        "vcpus": 2,
        "memory_bytes": 512 << 20,
        "kernel": "/k/vmlinuz",
        "initrd": "/k/initrd",
        "cmdline": "console=ttyS0",
        "disks": (
            DiskSpec(id="root", path="/img/rootfs.ext4", readonly=True, serial="vmfleet-root"),
            DiskSpec(id="vol3", path="/v/data.raw", readonly=False, serial="vmfleet-vol3", slot=3),
        ),
        "serial_log": "/g/logs/app.log",
        "run_dir": "/g/run",
        "hotplug_slots": 4,
    }
    values.update(changes)
    return VmSpec(**values)  # type: ignore[arg-type]


def test_console_is_appended_never_truncated() -> None:
    args = build_args(spec(), binary="qemu")
    assert "file,id=console,path=/g/logs/app.log,append=on" in args
    assert args[args.index("-m") + 1] == "512M"
    assert args[args.index("-smp") + 1] == "2"


def test_root_ports_for_hotplug_and_volumes_on_them() -> None:
    args = build_args(spec(), binary="qemu")
    ports = [a for a in args if a.startswith("pcie-root-port")]
    assert ports == [f"pcie-root-port,id=rp{i},slot={i},chassis={i}" for i in range(1, 5)]
    devices = [a for a in args if a.startswith("virtio-blk-pci")]
    assert devices == [
        "virtio-blk-pci,drive=root,id=dev-root,serial=vmfleet-root",
        "virtio-blk-pci,drive=vol3,id=dev-vol3,serial=vmfleet-vol3,bus=rp3",
    ]
    assert "driver=file,filename=/img/rootfs.ext4,node-name=file-root,read-only=on" in args


def test_accelerator_and_cpu_model() -> None:
    tcg = build_args(spec(accel="tcg"), binary="qemu")
    kvm = build_args(spec(accel="kvm"), binary="qemu")
    assert "q35,accel=tcg" in tcg and tcg[tcg.index("-cpu") + 1] == "max"
    assert "q35,accel=kvm" in kvm and kvm[kvm.index("-cpu") + 1] == "host"


def test_restore_differs_only_by_incoming() -> None:
    boot = build_args(spec(), binary="qemu")
    restore = build_args(spec(), binary="qemu", incoming=True)
    assert restore == [*boot, "-incoming", "defer"]


def test_disk_io_bps_throttles_every_disk_with_a_group_of_its_own() -> None:
    args = build_args(spec(disk_io_bps=1 << 20), binary="qemu")
    groups = [json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-object"]
    assert [g["id"] for g in groups] == ["tg-root", "tg-vol3"]
    assert groups[0] == {
        "qom-type": "throttle-group",
        "id": "tg-root",
        "limits": {"bps-total": 1 << 20, "bps-total-max": 4 << 20, "bps-total-max-length": 1},
    }
    # The device still names the disk's id: now the throttle node on top of the raw one.
    assert "driver=raw,file=file-vol3,node-name=raw-vol3" in args
    assert "driver=throttle,throttle-group=tg-vol3,file=raw-vol3,node-name=vol3" in args
    assert (
        "driver=throttle,throttle-group=tg-root,file=raw-root,node-name=root,read-only=on" in args
    )
    assert "virtio-blk-pci,drive=vol3,id=dev-vol3,serial=vmfleet-vol3,bus=rp3" in args


def test_no_throttle_without_disk_io_bps() -> None:
    args = build_args(spec(), binary="qemu")
    assert "-object" not in args and not any("throttle" in a for a in args)
