"""The client subcommands end to end, as a newcomer uses them: a real `vmfleet dev` stack
(NATS, a worker, the gateway), the test registry's busybox image, one QEMU guest.

One dev stack serves the whole module; only ``test_run_ps_logs_standby_restore_rm``
boots a guest, and it takes that one instance through every step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.embedded_nats import free_port
from tests.support.dev import VMFLEET, DevStack, dev_stack

HOST = "dev-host"  # the host id `dev_stack` gives its worker
#: Generous: a TCG guest on a busy 2-core machine (never asserted as a timing).
PATIENCE_S = 300


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    # Short: the guests' unix socket paths live below it (at most 107 bytes).
    data_dir = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))
    try:
        with dev_stack(data_dir, free_port()) as running:
            yield running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _env(stack: DevStack, **overrides: str | None) -> dict[str, str]:
    env = {**os.environ, "HYPEMAN_BASE_URL": stack.base_url, "HYPEMAN_API_KEY": stack.token}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def vmfleet(
    stack: DevStack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VMFLEET, *args],
        env=env or _env(stack),
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        check=False,
    )


def ok(stack: DevStack, *args: str) -> str:
    """stdout of a command that must succeed."""
    done = vmfleet(stack, *args)
    assert done.returncode == 0, f"vmfleet {' '.join(args)}: {done.stderr}"
    return done.stdout


def _follow_until(stack: DevStack, needle: str, *args: str) -> tuple[list[str], int]:
    """Run a following command until a line holds ``needle``; then Ctrl-C it."""
    proc = subprocess.Popen(
        [VMFLEET, *args], env=_env(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if needle in line:
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        found.wait(PATIENCE_S)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    return lines, proc.returncode


def test_errors_a_script_can_rely_on(stack: DevStack) -> None:
    for args in (("stop", "nope"), ("logs", "nope"), ("rm", "-f", "nope"), ("restore", "nope")):
        done = vmfleet(stack, *args)
        assert (done.returncode, done.stderr) == (
            1,
            "vmfleet: not_found: instance nope not found\n",
        )
        assert done.stdout == ""

    bad_token = vmfleet(stack, "ps", env=_env(stack, HYPEMAN_API_KEY="not-a-token"))
    assert (bad_token.returncode, bad_token.stderr) == (
        3,
        "vmfleet: Unauthorized: security requirements failed: invalid token\n",
    )

    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = vmfleet(stack, "hosts", env=_env(stack, HYPEMAN_BASE_URL=nowhere))
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith(
        f"vmfleet: unreachable: cannot reach the gateway at {nowhere}"
    )

    no_key = vmfleet(stack, "ps", env=_env(stack, HYPEMAN_API_KEY=None))
    assert no_key.returncode == 2
    assert no_key.stderr.startswith("vmfleet: configuration error: HYPEMAN_API_KEY: not set")

    usage = vmfleet(stack, "run", "--env", "NOEQUALS", "busybox")
    assert usage.returncode == 2 and "expected KEY=VALUE" in usage.stderr


def test_listings_print_tables_and_the_gateways_json(stack: DevStack, busybox_image: str) -> None:
    hosts = json.loads(ok(stack, "hosts", "--json"))
    assert [h["id"] for h in hosts] == [HOST]
    header, row = ok(stack, "hosts").splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "ACCEL"]
    assert row.split()[:2] == [HOST, "ready"]

    pulled = vmfleet(stack, "pull", busybox_image)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == f"{busybox_image}\n"
    assert pulled.stderr.splitlines()[-1] == f"{busybox_image}: ready"
    assert busybox_image in [i["name"] for i in json.loads(ok(stack, "image", "ls", "--json"))]
    assert ok(stack, "image", "ls").splitlines()[0].split() == ["NAME", "DIGEST", "SIZE", "AGE"]

    # Whatever the host says about an image the registry lacks, it is one line and exit 1.
    missing = vmfleet(stack, "pull", busybox_image.replace("busybox", "nothing-here"))
    assert missing.returncode == 1
    *statuses, last = missing.stderr.splitlines()
    assert re.fullmatch(r"vmfleet: \S+: .+", last), missing.stderr
    assert "not found" in last and "TaskGroup" not in last, last  # the host's own words
    assert all(
        line.startswith(f"{busybox_image.replace('busybox', 'nothing-here')}: ")
        for line in statuses
    )

    volume_id = ok(stack, "volume", "create", "scratch", "--size", "1").strip()
    listed = json.loads(ok(stack, "volume", "ls", "--json"))
    assert [(v["id"], v["name"], v["size_gb"]) for v in listed] == [(volume_id, "scratch", 1)]
    assert ok(stack, "volume", "ls").splitlines()[1].split()[:4] == [
        volume_id,
        "scratch",
        "1GB",
        "-",
    ]
    assert ok(stack, "volume", "rm", "scratch") == f"{volume_id}\n"
    gone = vmfleet(stack, "volume", "rm", "scratch")
    assert (gone.returncode, gone.stderr) == (1, "vmfleet: not_found: volume scratch not found\n")

    assert isinstance(json.loads(ok(stack, "ps", "-a", "--json")), list)
    for line in ok(stack, "events", "--json").splitlines():
        assert "state" in json.loads(line)


@pytest.mark.vm
def test_run_ps_logs_standby_restore_rm(stack: DevStack, busybox_image: str) -> None:
    volume_id = ok(stack, "volume", "create", "data", "--size", "1").strip()
    run = [
        "run",
        "--name",
        "hello",
        "--size",
        "256MB",
        "--vcpus",
        "1",
        "-e",
        "GREETING=hi",
        "-v",
        "data:/mnt/data",
        busybox_image,
        "/bin/sh",
        "-c",
        'echo "hello $GREETING"; sleep 3600',
    ]
    instance_id = ok(stack, *run).strip()
    try:
        _lifecycle(stack, busybox_image, instance_id, volume_id)
    finally:
        vmfleet(stack, "rm", "-f", instance_id)
        vmfleet(stack, "volume", "rm", volume_id)


def _lifecycle(stack: DevStack, image: str, instance_id: str, volume_id: str) -> None:
    assert len(instance_id) == 24

    # ps: the table, the JSON, and the id alone.
    header, *rows = ok(stack, "ps").splitlines()
    assert header.split() == ["ID", "NAME", "IMAGE", "STATE", "HOST", "AGE"]
    assert [r.split()[:5] for r in rows] == [[instance_id[:12], "hello", image, "Running", HOST]]
    (shown,) = json.loads(ok(stack, "ps", "--json"))
    assert (shown["id"], shown["env"], shown["host"]) == (instance_id, {"GREETING": "hi"}, HOST)
    assert ok(stack, "ps", "-q") == f"{instance_id}\n"

    # logs: followed until the app's line shows up (then Ctrl-C), then read back.
    lines, code = _follow_until(stack, "hello hi", "logs", "-f", "hello")
    assert "hello hi" in lines and code == 130
    assert "hello hi" in ok(stack, "logs", "hello").splitlines()
    assert ok(stack, "logs", "--source", "hypeman", "--tail", "5", instance_id[:6]) != ""

    # standby: gone from `ps`, shown by `ps -a`; restore by an id prefix.
    assert ok(stack, "standby", "hello") == f"{instance_id} Standby\n"
    assert ok(stack, "ps").splitlines()[1:] == []
    assert ok(stack, "ps", "-a").splitlines()[1].split()[3] == "Standby"
    assert ok(stack, "restore", instance_id[:8]) == f"{instance_id} Running\n"

    # the volume mounted at create; detach it and attach it again read-only.
    (listed,) = json.loads(ok(stack, "volume", "ls", "--json"))
    assert listed["attachments"] == [
        {"instance_id": instance_id, "mount_path": "/mnt/data", "readonly": False}
    ]
    assert ok(stack, "volume", "detach", "hello", "data") == "data detached from hello\n"
    attached = ok(stack, "volume", "attach", "hello", "data:/mnt/data:ro")
    assert attached == "data attached to hello at /mnt/data (read-only)\n"
    assert (
        ok(stack, "volume", "ls").splitlines()[1].split()[3] == f"{instance_id[:12]}:/mnt/data:ro"
    )
    in_use = vmfleet(stack, "volume", "rm", volume_id)
    assert in_use.returncode == 1 and in_use.stderr.startswith("vmfleet: conflict: ")

    # events: the history of this instance, as JSON lines and as a table.
    events = [
        json.loads(line)
        for line in ok(stack, "events", "--json", "--instance", "hello").splitlines()
    ]
    hops = [(e["previous"], e["state"]) for e in events]
    assert ("Running", "Paused") in hops and ("Paused", "Standby") in hops
    assert hops.index(("Paused", "Standby")) < len(hops) - 1  # and it came back
    assert f"{HOST}/hello  Paused -> Standby" in ok(stack, "events", "--instance", instance_id)

    # rm: a running instance needs -f; then it is gone everywhere.
    refused = vmfleet(stack, "rm", "hello")
    assert (refused.returncode, refused.stderr) == (
        1,
        "vmfleet: invalid_state: instance hello is Running: stop it first, or use rm -f\n",
    )
    assert ok(stack, "rm", "-f", "hello") == f"{instance_id}\n"
    assert instance_id not in ok(stack, "ps", "-a", "-q")
    gone = vmfleet(stack, "stop", "hello")
    assert (gone.returncode, gone.stderr) == (1, "vmfleet: not_found: instance hello not found\n")
    assert ok(stack, "volume", "rm", "data") == f"{volume_id}\n"
