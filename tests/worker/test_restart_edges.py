"""The restart policy's edge cases on a real engine whose boots are faked (no VM): a worker
that died in the middle of a restart's boot, a policy PATCHed onto an instance whose
program already ended, and a VMM exit seen while the instance is Unknown. Each restart
decision is carried out exactly once: one boot, one attempt counted."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from schemas.api import InstanceState
from schemas.clock import utc_now
from schemas.messages import InstanceRecord, RestartPolicySpec, RestartState, Stop, Update
from tests.worker.bootless import BootCounter, adopt, bootless_context, fake_boot, write_record
from worker.engine import HostEngine
from worker.supervisor import supervise_restarts

pytestmark = pytest.mark.anyio

ID = "r" + "1" * 23
ALWAYS = RestartPolicySpec(policy="always", backoff_s=0.05)
ON_FAILURE = RestartPolicySpec(policy="on_failure", backoff_s=0.05)


class ExitedVmm:
    """A VMM the watcher finds gone (reaped with ``returncode``)."""

    pid = 999_999
    returncode = 0

    def running(self) -> bool:
        return False


async def restarts_until_running(engine: HostEngine, counter: BootCounter) -> InstanceRecord:
    """Run the restart loop until the instance is Running again, then a few more passes
    (a decision taken twice would boot twice there)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: supervise_restarts(engine, interval_s=0.02))
        with anyio.fail_after(20):
            while engine.get(ID).state is not InstanceState.RUNNING:
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    assert counter.boots == [ID]
    return engine.get(ID)


async def test_a_restart_cut_short_by_the_worker_dying_is_taken_once_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = bootless_context(tmp_path)
    # What a worker SIGKILLed in attempt 2's boot leaves: the attempt taken in the record
    # (Initializing, attempts 2, nothing scheduled), the restart's command mark, no VMM.
    taken = utc_now() - timedelta(seconds=5)
    write_record(
        ctx,
        ID,
        state=InstanceState.INITIALIZING,
        restart_policy=ALWAYS,
        restart=RestartState(attempts=2, last_attempt_at=taken),
    )
    ctx.storage.guest(ID).mark_command(f"restart-{ID}-2")

    engine = HostEngine(ctx)
    await engine.recover()
    recovered = engine.get(ID)
    assert recovered.state is InstanceState.STOPPED
    assert recovered.restart.next_attempt_at is not None  # still owed
    assert recovered.restart.attempts == 1  # attempt 2 is taken again, not counted twice

    counter = fake_boot(monkeypatch, ctx)
    after = await restarts_until_running(engine, counter)
    assert after.restart.attempts == 2 and after.restart.next_attempt_at is None
    assert after.last_command_id == f"restart-{ID}-2"
    assert (
        "restart interrupted by the worker's restart" in ctx.storage.guest(ID).ops_log.read_text()
    )


async def test_a_worker_dying_in_a_users_start_owes_no_restart(tmp_path: Path) -> None:
    ctx = bootless_context(tmp_path)
    write_record(ctx, ID, state=InstanceState.INITIALIZING, restart_policy=ALWAYS)
    ctx.storage.guest(ID).mark_command("cmd-start-by-user")
    engine = HostEngine(ctx)
    await engine.recover()
    record = engine.get(ID)
    assert record.state is InstanceState.STOPPED and record.restart == RestartState()


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts"),
    [(ALWAYS, 0, True), (ON_FAILURE, 0, False), (ON_FAILURE, 3, True), (None, 3, False)],
)
async def test_a_policy_patched_onto_an_ended_program_judges_that_end(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: RestartPolicySpec | None,
    exit_code: int,
    restarts: bool,
) -> None:
    """As hypeman's controller does with every Stopped instance that has a policy."""
    ctx = bootless_context(tmp_path)
    engine = HostEngine(ctx)
    adopt(
        engine,
        write_record(
            ctx, ID, state=InstanceState.STOPPED, exit_code=exit_code, exit_message="exit"
        ),
    )
    await engine.execute(
        Update(id="patch-1", instance_id=ID, issued_at=utc_now(), restart_policy=policy)
    )
    scheduled = engine.get(ID).restart.next_attempt_at
    assert (scheduled is not None) is restarts
    if restarts:
        counter = fake_boot(monkeypatch, ctx)
        after = await restarts_until_running(engine, counter)
        assert after.restart.attempts == 1


async def test_a_policy_patched_onto_a_user_stopped_instance_restarts_nothing(
    tmp_path: Path,
) -> None:
    ctx = bootless_context(tmp_path)
    engine = HostEngine(ctx)
    adopt(engine, write_record(ctx, ID, state=InstanceState.RUNNING))
    await engine.execute(Stop(id="stop-1", instance_id=ID, issued_at=utc_now()))
    await engine.execute(
        Update(id="patch-1", instance_id=ID, issued_at=utc_now(), restart_policy=ALWAYS)
    )
    record = engine.get(ID)
    assert record.state is InstanceState.STOPPED and record.restart.next_attempt_at is None


async def test_a_vmm_exit_seen_while_unknown_is_one_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adopted VMM whose state could not be read (Unknown), mid-way through attempt 1
    when the last worker died, exits: Stopped with one restart scheduled, taken once."""
    ctx = bootless_context(tmp_path)
    engine = HostEngine(ctx)
    inst = adopt(
        engine,
        write_record(
            ctx,
            ID,
            state=InstanceState.UNKNOWN,
            restart_policy=ALWAYS,
            restart=RestartState(attempts=1, last_attempt_at=utc_now()),
        ),
    )
    inst.process = ExitedVmm()  # type: ignore[assignment]
    engine._interrupted[ID] = f"restart-{ID}-1"  # the mark its recovery read
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: engine.watch_vmms(interval_s=0.02))
        with anyio.fail_after(20):
            while engine.get(ID).state is not InstanceState.STOPPED:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    stopped = engine.get(ID)
    assert stopped.restart.attempts == 1 and stopped.restart.next_attempt_at is not None

    counter = fake_boot(monkeypatch, ctx)
    after = await restarts_until_running(engine, counter)
    assert after.restart.attempts == 2
    assert after.last_command_id == f"restart-{ID}-2"
