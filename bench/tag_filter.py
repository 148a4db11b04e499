"""The list filter of ``GET /instances?tags[k]=v&state=`` over 10,000 records, as the
gateway runs it: on its in-memory view, in one pass (no NATS needed for this number).

    .venv/bin/python -m bench.tag_filter
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime

from gateway.view import FleetView
from schemas.api import Hypervisor, InstanceState
from schemas.messages import HostRecord, InstanceRecord
from schemas.subjects import Subjects

RECORDS = 10_000


def _view() -> FleetView:
    view = FleetView(None, Subjects("bench"), host_ttl_s=3600)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    for h in range(10):
        host = HostRecord(id=f"h{h}", started_at=now, heartbeat_at=now)
        view._hosts[host.id] = (host, time.monotonic() + 3600)
    for i in range(RECORDS):
        view.instances[f"i{i:023d}"] = InstanceRecord(
            id=f"i{i:023d}",
            name=f"vm-{i}",
            image="busybox",
            host=f"h{i % 10}",
            state=InstanceState.RUNNING if i % 3 else InstanceState.STOPPED,
            size_bytes=1 << 30,
            overlay_bytes=10 << 30,
            vcpus=1,
            hypervisor=Hypervisor.QEMU,
            created_at=now,
            tags={"team": f"t{i % 20}", "env": "ci" if i % 2 else "prod", "run": str(i)},
        )
    return view


def main() -> None:
    view = _view()
    timings = []
    for _ in range(50):
        started = time.perf_counter()
        found = view.matching("Running", {"team": "t3", "env": "ci"})
        timings.append(time.perf_counter() - started)
    print(
        f"tag filter over {RECORDS} records: {len(found)} matches, "
        f"median {statistics.median(timings) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
