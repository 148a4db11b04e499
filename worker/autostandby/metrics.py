"""``vmfleet_worker_instances_standby{cause}``: this host's instances in Standby, by why
they went there (``idle``: their policy; ``api``: a user's standby), read from the records
at each scrape."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.api import InstanceState
from schemas.messages import InstanceRecord

__all__ = ["StandbyByCause"]

_CAUSES: Final = ("api", "idle")


class StandbyByCause(Collector):
    def __init__(self, records: Callable[[], Iterable[InstanceRecord]]) -> None:
        self._records = records

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        counts = Counter(
            "idle" if record.cause == "idle" else "api"
            for record in self._records()
            if record.state is InstanceState.STANDBY
        )
        family = GaugeMetricFamily(
            "vmfleet_worker_instances_standby",
            "Instances in Standby on this host, by cause (idle: the auto-standby policy)",
            labels=["cause"],
        )
        for cause in _CAUSES:
            family.add_metric([cause], counts.get(cause, 0))
        yield family
