"""Bridge mode's observer on the kernel's real conntrack table, in a network namespace of
the test's own (nothing of the host's network is touched): a connection to the guest's
address and one DNATed to it both count, and neither counts once it is the worker's own."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.network.namespace import ip, remove_namespace

ROOT = Path(__file__).parents[3]


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_flows_to_the_guest_and_dnat_ones_count_and_own_ones_do_not() -> None:
    ns = f"vftest-{secrets.token_hex(4)}"
    ip("netns", "add", ns)
    try:
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "tests.worker.autostandby.conntrack_probe",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        remove_namespace(ns)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert [port for port, _, _ in result["counted"]] == [80, 8080]
    assert all(peer == "10.99.0.1" for _, peer, _ in result["counted"])
    assert result["own"] == []
