"""Running a worker probe inside a network namespace of the test's own.

Safety: every packet stays in the namespace ``vftest-<random>``; the host's own network
configuration is never touched. The image is pulled beforehand from the host side, because
the test registry listens on the host's loopback, which the namespace cannot reach (the
cache then answers the tag by itself). A probe prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from worker.images import ImageCache
from worker.lifecycle.context import BootAssets

ROOT = Path(__file__).parents[3]

Probe = Callable[[dict[str, str]], Awaitable[dict[str, Any]]]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def remove_namespace(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def run_probe_in_namespace(
    probe: Path,
    data_dir: Path,
    boot_assets: BootAssets,
    image: str,
    *,
    timeout_s: float,
) -> dict[str, Any]:
    """Run ``probe`` (a script whose main() is :func:`probe_main`) in a fresh namespace and
    return its result; fail the test with its output when it printed none or an error."""
    if os.geteuid() != 0:
        pytest.fail("bridge mode needs root (network namespaces, TAPs, tc, nftables)")
    await ImageCache(data_dir / "images").pull(image)
    ns = f"vftest-{secrets.token_hex(4)}"
    args = {
        "data_dir": str(data_dir),
        "image": image,
        "kernel": str(boot_assets.kernel),
        "initrd": str(boot_assets.initrd),
        "accel": boot_assets.accel,
    }
    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process(
                ["ip", "netns", "exec", ns, sys.executable, str(probe), json.dumps(args)],
                check=False,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
    finally:
        remove_namespace(ns)
    stdout, stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"probe printed no result:\n{stdout}\n{stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    assert "error" not in result, json.dumps(result, indent=1)
    return result


def probe_main(probe: Probe, diagnostics: Mapping[str, Sequence[str]] = {}) -> None:
    """A probe script's entry point: run it, print its result, or on failure the traceback,
    the guests' log tails, the namespace's links and what each diagnostics command says."""
    args = json.loads(sys.argv[1])
    try:
        result = anyio.run(probe, args)
    except BaseException:
        logs = {
            str(path): path.read_text(errors="replace")[-2000:]
            for path in Path(args["data_dir"]).glob("guests/*/**/*.log")
        }
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        result = {"error": traceback.format_exc(), "logs": logs, "links": links}
        for name, argv in diagnostics.items():
            done = subprocess.run(list(argv), capture_output=True, text=True)
            result[name] = done.stdout + done.stderr
    print("RESULT " + json.dumps(result), flush=True)
