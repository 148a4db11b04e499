"""Warm-template starts on real QEMU guests: one template built, two instances resumed from
it. Each must be its own machine: its own MAC, hostname, random numbers, disks and config,
with exec through its agent, and standby/restore working as for a cold-booted one."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from schemas.api import InstanceState
from schemas.clock import utc_now as now
from schemas.messages import AttachVolume, Restore, Standby, Start, Stop
from tests.worker.agent.conftest import Output, _delete_all, attach_agent_hub, collect
from tests.worker.conftest import MIB, create_command, make_context
from worker.agent import AgentHub, Frame
from worker.daemon import _agent_news
from worker.drivers.qemu import qemu_binary
from worker.engine import HostEngine
from worker.lifecycle.context import BootAssets
from worker.network import mac_for
from worker.templates import TemplateManager, TemplateShape

pytestmark = pytest.mark.vm

SHAPE = TemplateShape(memory_bytes=256 * MIB, vcpus=1, network=True)


@dataclass
class Fleet:
    portal: BlockingPortal
    hub: AgentHub
    engine: HostEngine
    templates: TemplateManager
    ids: tuple[str, str]

    def exec(self, instance_id: str, command: list[str]) -> Output:
        async def run() -> Output:
            async with await self.hub.open_session(instance_id, "exec", wait_s=30) as session:
                await session.send(Frame.json({"tty": False, "command": command}))
                return await collect(session)

        return self.portal.call(run)

    def sh(self, instance_id: str, script: str) -> str:
        out = self.exec(instance_id, ["sh", "-c", script])
        assert out.exit_code == 0, out
        return out.data.decode().strip()


@pytest.fixture(scope="module")
def fleet(boot_assets: BootAssets, busybox_image: str) -> Iterator[Fleet]:
    data_dir = Path(tempfile.mkdtemp(prefix="vft", dir="/tmp"))
    try:
        with start_blocking_portal() as portal:
            hub = AgentHub()
            hub_task, _ = portal.start_task(hub.run)
            ctx = make_context(data_dir, boot_assets)
            attach_agent_hub(ctx, hub)
            templates = TemplateManager(
                data_dir / "templates",
                ctx.driver,
                boot_assets,
                budget_bytes=2 << 30,
                vmm_binary=qemu_binary(),
                shapes=(),
            )
            ctx.templates = templates
            engine = HostEngine(ctx)
            hub.on_news = functools.partial(_agent_news, engine)
            try:
                assert portal.call(templates.ensure, SHAPE) is not None
                ids = []
                for name, word in (("alpha", "one"), ("beta", "two")):
                    cmd = create_command(
                        busybox_image, name=name, cmd=["sleep", "100000"], env={"WORD": word}
                    )
                    portal.call(engine.execute, cmd)
                    ids.append(cmd.instance_id)
                yield Fleet(portal, hub, engine, templates, (ids[0], ids[1]))
            finally:
                portal.call(_delete_all, engine)
                hub_task.cancel()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_both_instances_started_from_the_template(fleet: Fleet) -> None:
    for iid in fleet.ids:
        inst = fleet.engine.instance(iid)
        assert inst.state is InstanceState.RUNNING
        ops = inst.guest.ops_log.read_text()
        assert "VMM started from a warm template" in ops
        assert "template=" in ops.split("create phases", 1)[1].splitlines()[0]


def test_each_has_its_own_mac_hostname_and_address(fleet: Fleet) -> None:
    seen = []
    for iid in fleet.ids:
        record = fleet.engine.instance(iid).record
        mac = fleet.sh(iid, "cat /sys/class/net/eth0/address")
        assert mac == mac_for(iid) == record.mac
        assert fleet.sh(iid, "hostname") == record.name
        assert f"inet {record.ip}/" in fleet.sh(iid, "ip -4 addr show eth0")
        seen.append((mac, record.name))
    assert seen[0] != seen[1]


def test_random_numbers_differ(fleet: Fleet) -> None:
    draws = [fleet.sh(iid, "head -c 32 /dev/urandom | od -An -tx1") for iid in fleet.ids]
    assert draws[0] != draws[1]
    for iid in fleet.ids:  # each guest's RNG was reseeded at resume, not only fed
        assert "RNG not reseeded" not in fleet.engine.instance(iid).guest.app_log.read_text()


def test_each_reads_its_own_disks_and_config(fleet: Fleet) -> None:
    for iid, word in zip(fleet.ids, ("one", "two"), strict=True):
        assert fleet.sh(iid, "echo $WORD") == word
        # The overlay's whole size is seen (the template's placeholder was 1 MiB).
        assert int(fleet.sh(iid, "cat /sys/block/vdb/size")) * 512 == 256 * MIB
        fleet.sh(iid, f"echo {word} > /written-here")
    for iid, word in zip(fleet.ids, ("one", "two"), strict=True):
        assert fleet.sh(iid, "cat /written-here") == word
        assert fleet.sh(iid, "ls /bin/busybox") == "/bin/busybox"  # the image's root


def test_standby_and_restore_of_a_warm_started_instance(fleet: Fleet) -> None:
    iid = fleet.ids[0]
    fleet.portal.call(
        fleet.engine.execute, Standby(id=f"standby-{iid}", instance_id=iid, issued_at=now())
    )
    record = fleet.portal.call(
        fleet.engine.execute, Restore(id=f"restore-{iid}", instance_id=iid, issued_at=now())
    )
    assert record is not None and record.state is InstanceState.RUNNING
    assert fleet.sh(iid, "cat /written-here") == "one"


def test_hot_attach_then_stop_and_start_of_a_warm_started_instance(fleet: Fleet) -> None:
    iid = fleet.ids[1]

    async def attach() -> None:
        await fleet.engine.ctx.volumes.create("vol-tmpl", "tmpl", 1)
        await fleet.engine.execute(
            AttachVolume(
                id=f"att-{iid}",
                instance_id=iid,
                issued_at=now(),
                volume_id="vol-tmpl",
                mount_path="/mnt/data",
                readonly=False,
            )
        )

    fleet.portal.call(attach)
    fleet.sh(iid, "echo kept > /mnt/data/file && sync")
    # A stopped instance starts with a cold boot, its volume mounted at boot this time.
    fleet.portal.call(
        fleet.engine.execute, Stop(id=f"stop-{iid}", instance_id=iid, issued_at=now())
    )
    record = fleet.portal.call(
        fleet.engine.execute, Start(id=f"start-{iid}", instance_id=iid, issued_at=now())
    )
    assert record is not None and record.state is InstanceState.RUNNING
    assert fleet.sh(iid, "cat /mnt/data/file /written-here") == "kept\ntwo"


def test_a_disk_bandwidth_limit_is_kept_on_a_warm_start(fleet: Fleet, busybox_image: str) -> None:
    cmd = create_command(busybox_image, name="gamma", cmd=["sleep", "100000"], disk_io_bps=50 * MIB)
    fleet.portal.call(fleet.engine.execute, cmd)
    inst = fleet.engine.instance(cmd.instance_id)
    assert "VMM started from a warm template" in inst.guest.ops_log.read_text()
    assert inst.spec is not None and inst.spec.disk_io_bps == 50 * MIB
    assert fleet.sh(cmd.instance_id, "cat /sys/block/vdb/size") == str(256 * MIB // 512)
