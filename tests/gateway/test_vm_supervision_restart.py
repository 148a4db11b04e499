"""A program's end and the restart policy through hypeman's SDK, on real guests: the exit
code of a job, a policy that gives up after its attempts (with the worker SIGKILLed in
the middle of a backoff), a policy that restarts after success, and a user's stop that
blocks it."""

from __future__ import annotations

import time

import pytest
from hypeman import Hypeman

from tests.gateway.conftest import Fleet
from tests.support.sdk import sdk_client, wait_for_instance

pytestmark = pytest.mark.vm

#: A job that fails on its first run and serves on later ones (its overlay keeps the mark).
FAIL_ONCE = "[ -f /root/ran ] && exec sleep 3600; touch /root/ran; echo failing; exit 3"


def _runs(client: Hypeman, instance_id: str, word: str) -> int:
    return sum(word in line for line in client.instances.logs(instance_id, tail=2000))


def test_a_job_exit_code_is_recorded_and_cleared_by_the_next_start(
    fleet: Fleet, busybox_image: str
) -> None:
    client = sdk_client(fleet)
    created = client.instances.create(
        name="job", image=busybox_image, size="256MB", vcpus=1, cmd=["sh", "-c", FAIL_ONCE]
    )
    try:
        assert created.restart_policy is None
        stopped = wait_for_instance(client, created.id, lambda i: i.state == "Stopped")
        assert (stopped.exit_code, stopped.exit_message) == (3, "exit code 3")
        assert stopped.state_error is None and stopped.restart_status is None
        time.sleep(3)  # policy never: it stays Stopped
        assert client.instances.get(created.id).state == "Stopped"

        started = client.instances.start(created.id)
        assert started.state == "Running"
        assert (started.exit_code, started.exit_message) == (None, None)
        assert _runs(client, created.id, 'HYPEMAN-EXIT code=3 message="exit code 3"') == 1
    finally:
        client.instances.delete(created.id)


def test_on_failure_gives_up_after_max_attempts_even_across_a_worker_kill(
    fleet: Fleet, busybox_image: str
) -> None:
    client = sdk_client(fleet)
    created = client.instances.create(
        name="flaky",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["sh", "-c", "echo attempt-run; exit 1"],
        restart_policy={"policy": "on_failure", "max_attempts": 2, "backoff": "15s"},
    )
    try:
        assert created.restart_policy is not None
        assert created.restart_policy.backoff == "15s"
        assert created.restart_policy.stable_after == "10m0s"
        assert created.restart_policy.max_attempts == 2
        waiting = wait_for_instance(
            client,
            created.id,
            lambda i: i.restart_status is not None and i.restart_status.next_attempt_at is not None,
        )
        assert waiting.state == "Stopped" and waiting.exit_code == 1
        # SIGKILL the worker in the backoff: the next one takes the schedule from the record.
        fleet.worker.kill()
        fleet.worker.start()
        blocked = wait_for_instance(
            client,
            created.id,
            lambda i: i.restart_status is not None and i.restart_status.blocked_reason is not None,
        )
        assert blocked.state == "Stopped" and blocked.exit_code == 1
        assert blocked.restart_status is not None
        assert blocked.restart_status.blocked_reason == "max_attempts_exceeded"
        assert blocked.restart_status.attempts == 2
        assert blocked.restart_status.next_attempt_at is None
        assert blocked.restart_status.last_attempt_at is not None
        assert _runs(client, created.id, "HYPEMAN-EXIT code=1") == 3
    finally:
        if fleet.worker.proc is not None and fleet.worker.proc.poll() is not None:
            fleet.worker.start()
        client.instances.delete(created.id)


def test_always_restarts_after_success_until_the_user_stops_it(
    fleet: Fleet, busybox_image: str
) -> None:
    client = sdk_client(fleet)
    created = client.instances.create(
        name="loop",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["sh", "-c", "echo looping; sleep 15; exit 0"],
        restart_policy={"policy": "always", "backoff": "1s"},
    )
    try:
        wait_for_instance(
            client,
            created.id,
            lambda i: (
                i.state == "Running"
                and i.restart_status is not None
                and (i.restart_status.attempts or 0) >= 1
            ),
        )
        client.instances.stop(created.id)
        stopped = client.instances.get(created.id)
        assert stopped.restart_status is not None
        assert stopped.restart_status.blocked_reason == "manual_stop"
        time.sleep(5)  # past the backoff: no restart
        still = client.instances.get(created.id)
        assert still.state == "Stopped"
        assert _runs(client, created.id, 'HYPEMAN-EXIT code=0 message="success"') >= 1

        restarted = client.instances.start(created.id)  # the block and counters go
        assert restarted.restart_status is None or restarted.restart_status.attempts == 0
        assert restarted.restart_policy is not None and restarted.restart_policy.policy == "always"
    finally:
        client.instances.delete(created.id)
