"""Health checks through hypeman's SDK on one real guest: a busybox httpd behind a port
mapping (the fleet's worker networks in user mode, where a check goes through it) turns
healthy, unhealthy once the server is killed, is restarted by its on_failure policy and
turns healthy again; then a PATCH replaces the check with an exec one, run through the
guest agent."""

from __future__ import annotations

import os
import re
import subprocess

import httpx
import pytest
from hypeman.lib import exec
from hypeman.types import Instance
from prometheus_client.parser import text_string_to_metric_families

from cli.embedded_nats import free_port
from tests.gateway.conftest import Fleet
from tests.support.dev import VMFLEET
from tests.support.sdk import sdk_client, wait_for_instance
from worker.lifecycle.phases import PHASES

pytestmark = pytest.mark.vm

#: The app: a web server in the background, so that killing it leaves the program running
#: (an unhealthy instance, not an exited one).
SERVE = (
    "mkdir -p /www && echo ok > /www/index.html && httpd -f -p 8080 -h /www & exec sleep 1000000"
)


#: The ops log's line at the end of a create.
CREATE_PHASES = re.compile(r"create phases pull=\d+ms disks=\d+ms vmm=\d+ms boot=\d+ms agent=\d+ms")


def _create_phase_counts(fleet: Fleet) -> dict[str, float]:
    """Samples of the worker's histogram per create step."""
    text = httpx.get(fleet.worker.metrics_url, timeout=10).text
    return {
        sample.labels["phase"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vmfleet_worker_create_phase_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    }


def _health(instance: Instance) -> str | None:
    return instance.health_status.status if instance.health_status else None


def test_http_check_unhealthy_restart_then_exec_check(fleet: Fleet, busybox_image: str) -> None:
    client = sdk_client(fleet)
    created = client.instances.create(
        name="web-health",
        image=busybox_image,
        size="256MB",
        vcpus=1,
        cmd=["sh", "-c", SERVE],
        health_check={
            "http": {"port": 8080},
            "interval": "1s",
            "timeout": "1s",
            "start_period": "1s",
            "failure_threshold": 2,
        },
        restart_policy={"policy": "on_failure", "backoff": "1s"},
        extra_body={"port_mappings": [{"guest_port": 8080, "host_port": free_port()}]},
    )
    try:
        check = created.health_check
        assert check is not None and check.type == "http" and check.http is not None
        assert (check.http.path, check.http.expected_status, check.http.scheme) == (
            "/",
            200,
            "http",
        )
        assert (check.interval, check.timeout, check.start_period) == ("1s", "1s", "1s")
        assert (check.failure_threshold, check.success_threshold) == (2, 1)

        healthy = wait_for_instance(client, created.id, lambda i: _health(i) == "healthy")
        assert healthy.health_status is not None
        assert healthy.health_status.last_success_at is not None
        assert healthy.restart_status is None

        killed = exec(client, created.id, ["killall", "httpd"])
        assert killed.exit_code == 0
        restarted = wait_for_instance(
            client,
            created.id,
            lambda i: i.restart_status is not None and i.restart_status.attempts >= 1,
        )
        assert restarted.restart_status is not None
        assert restarted.restart_status.last_reason == "health_check_failed"
        again = wait_for_instance(
            client, created.id, lambda i: i.state == "Running" and _health(i) == "healthy"
        )
        assert again.health_status is not None
        assert again.health_status.consecutive_failures == 0
        # Where its life went: every state it passed through, the current one live.
        assert again.current_phase == "running" and again.current_phase_since is not None
        assert again.phase_durations_ms is not None
        walked = {"created", "initializing", "running", "shutdown", "stopped"}
        assert walked <= set(again.phase_durations_ms)
        # The ops log says why it went down.
        ops = "\n".join(client.instances.logs(created.id, source="hypeman", tail=500))
        assert "health healthy -> unhealthy" in ops
        # Where its create went, step by step: in the ops log and in the worker's metrics.
        assert CREATE_PHASES.search(ops), ops
        counts = _create_phase_counts(fleet)
        # A cold boot: every step but a warm template's resume.
        cold = [phase for phase in PHASES if phase != "template"]
        assert all(counts.get(phase, 0) >= 1 for phase in cold), counts

        # PATCH replaces the check whole: an exec one, run through the guest agent.
        patched = client.instances.update(
            created.id,
            health_check={"exec": {"command": ["true"]}, "interval": "1s", "timeout": "1s"},
        )
        assert patched.health_check is not None and patched.health_check.type == "exec"
        assert patched.health_check.http is None
        assert patched.health_check.exec is not None
        assert patched.health_check.exec.command == ["true"]
        assert patched.health_check.start_period == "30s"  # hypeman's default
        checked = wait_for_instance(
            client,
            created.id,
            lambda i: (
                i.health_status is not None
                and i.health_status.status == "healthy"
                and i.health_status.consecutive_successes >= 1
            ),
        )
        assert checked.health_check is not None and checked.health_check.type == "exec"
    finally:
        client.instances.delete(created.id)


def test_cli_run_with_restart_and_health_cmd(fleet: Fleet, busybox_image: str) -> None:
    env = {**os.environ, "HYPEMAN_BASE_URL": fleet.api.base_url, "HYPEMAN_API_KEY": fleet.api.token}
    flags = ["--restart", "on-failure:3", "--health-cmd", "test -d /proc"]
    timing = ["--health-interval", "1s", "--health-timeout", "1s", "--ttl", "1h"]
    ran = subprocess.run(
        [
            VMFLEET,
            "run",
            "--size",
            "256MB",
            "--vcpus",
            "1",
            "--tag",
            "kind=health",
            *flags,
            *timing,
            busybox_image,
            "sleep",
            "100000",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    instance_id = ran.stdout.strip()
    client = sdk_client(fleet)
    try:
        healthy = wait_for_instance(client, instance_id, lambda i: _health(i) == "healthy")
        assert healthy.restart_policy is not None
        assert (healthy.restart_policy.policy, healthy.restart_policy.max_attempts) == (
            "on_failure",
            3,
        )
        assert healthy.health_check is not None and healthy.health_check.exec is not None
        assert healthy.health_check.exec.command == ["/bin/sh", "-c", "test -d /proc"]
        assert healthy.tags == {"kind": "health"} and healthy.expires_at is not None
        listed = subprocess.run(
            [VMFLEET, "ps", "--filter", "tag=kind=health"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert "Running (healthy)" in listed.stdout, listed.stdout
        # update swaps the policy and the check on the running instance, by its name.
        name = healthy.name
        flags = ["--restart", "always", "--health-cmd", "test -f /proc/version", "--ttl", "2h"]
        updated = subprocess.run(
            [VMFLEET, "update", *flags, "--health-retries", "5", name],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert updated.returncode == 0, updated.stderr
        assert updated.stdout.startswith(f"{instance_id} expires ")
        assert updated.stdout.rstrip().endswith("restart always health-check exec")
        changed = client.instances.get(instance_id)
        assert changed.state == "Running" and changed.restart_policy is not None
        assert changed.restart_policy.policy == "always"
        assert changed.health_check is not None and changed.health_check.exec is not None
        assert changed.health_check.exec.command == ["/bin/sh", "-c", "test -f /proc/version"]
        assert changed.health_check.failure_threshold == 5
        assert changed.expires_at is not None and healthy.expires_at is not None
        assert changed.expires_at > healthy.expires_at
    finally:
        client.instances.delete(instance_id)
    for bad in (["--restart", "sometimes"], ["--health-interval", "1s"]):
        refused = subprocess.run(
            [VMFLEET, "run", *bad, busybox_image],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.returncode != 0 and bad[0] in refused.stderr, refused.stderr
