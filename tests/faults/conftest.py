"""The fault tests' stack (one for the package) and their report mode.

With ``--reliability-report`` or ``VMFLEET_RELIABILITY_REPORT=1`` the session ends by
writing ``docs/reliability.md`` from what the tests saw.
"""

from __future__ import annotations

import secrets
import shutil
import urllib.parse
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.faults.report import REPORT, SEED, report_enabled
from tests.faults.stack import Stack, deadline_loop
from tests.support.cluster import NatsCluster
from tests.support.fleet import WorkerProcess
from tests.support.gateway_process import GatewayProcess


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        action="store_true",
        default=False,
        help="write docs/reliability.md from the fault tests (or VMFLEET_RELIABILITY_REPORT=1)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"fault tests: seed {SEED} (VMFLEET_FAULT_SEED)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A cell's pass or failure goes into the report, with the failure's first line."""
    report = yield
    if report.when != "call" and not report.failed:
        return report
    params = getattr(getattr(item, "callspec", None), "params", {})
    failure = str(call.excinfo.value).splitlines()[0][:300] if call.excinfo else None
    cell = REPORT.cells.get((params.get("fault"), params.get("op")))
    if cell is not None:
        cell.passed = report.passed and cell.passed is not False
        if report.failed:
            cell.failure = failure
    section = getattr(getattr(item, "function", None), "report_section", None)
    if section is not None and section in REPORT.sections:
        REPORT.section_passed[section] = report.passed
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    option = session.config.getoption("reliability_report", default=False)
    if report_enabled(bool(option)) and (REPORT.cells or REPORT.sections):
        path = REPORT.write()
        print(f"\nreliability report written to {path}")


@pytest.fixture(scope="package")
def stack(
    tmp_path_factory: pytest.TempPathFactory, test_assets: Path, busybox_image: str
) -> Iterator[Stack]:
    """A 3-node cluster, a worker and a gateway (all R3), the test image pulled on the
    host, a volume for the attach cells, and each operation timed once, fault-free."""
    root = tmp_path_factory.mktemp("faults")
    prefix = "f" + secrets.token_hex(4)
    cluster = NatsCluster(root / "cluster")
    cluster.start()
    urls = ",".join(cluster.urls)
    worker = WorkerProcess(urls, prefix, test_assets, VMFLEET_REPLICAS="3")
    gateway = GatewayProcess(urls, prefix, VMFLEET_REPLICAS="3")
    stack = Stack(
        cluster=cluster, worker=worker, gateway=gateway, prefix=prefix, image=busybox_image
    )
    try:
        worker.start()
        gateway.start()
        gateway.wait_ready()
        stack.wait_host_live()
        _calibrate(stack)
        yield stack
    finally:
        for log in (worker.log, gateway.log):  # kept for a look after a failure
            if log.exists():
                shutil.copy(log, root / log.name)
        stack.close()
        gateway.cleanup()
        worker.cleanup()
        cluster.stop()


def _calibrate(stack: Stack) -> None:
    """Pull the image, make the volume, and time each operation once without a fault."""
    stack.ok("POST", "/images", json={"name": stack.image})
    name = urllib.parse.quote(stack.image, safe="")
    with deadline_loop(300, "the test image pulled") as tick:
        while stack.call("GET", f"/images/{name}").body.get("status") != "ready":
            tick()
    stack.volume_id = stack.ok("POST", "/volumes", json={"name": "faults", "size_gb": 1})["id"]
    iid = stack.timed("create", "POST", "/instances", json=stack.create_body("calibration"))["id"]
    stack.wait_guest_up(iid, 0)
    stack.timed("standby", "POST", f"/instances/{iid}/standby")
    stack.timed("restore", "POST", f"/instances/{iid}/restore")
    stack.timed(
        "attach",
        "POST",
        f"/instances/{iid}/volumes/{stack.volume_id}",
        json={"mount_path": "/data"},
    )
    stack.ok("DELETE", f"/instances/{iid}/volumes/{stack.volume_id}")
    stack.timed("stop", "POST", f"/instances/{iid}/stop")
    stack.ok("DELETE", f"/instances/{iid}")
    REPORT.durations = dict(stack.durations)
