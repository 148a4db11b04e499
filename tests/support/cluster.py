"""A 3-node nats-server cluster with JetStream, on loopback ports."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import nats

from cli.embedded_nats import NatsServerProcess, free_port

__all__ = ["NatsCluster"]


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        self.servers = [
            NatsServerProcess(
                root / f"n{i}",
                extra_args=(
                    "--server_name",
                    f"n{i}",
                    "--cluster_name",
                    "vmfleet-test",
                    "--cluster",
                    f"nats://127.0.0.1:{cluster_ports[i]}",
                    "--routes",
                    routes,
                ),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout_s: float = 60) -> None:
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_ready(timeout_s)
        anyio.run(self._wait_for_jetstream, timeout_s)

    async def _wait_for_jetstream(self, timeout_s: float) -> None:
        """The cluster's JetStream answers once its meta leader is elected."""
        deadline = time.monotonic() + timeout_s
        nc = await nats.connect(self.urls)
        try:
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.2)
        finally:
            await nc.close()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
