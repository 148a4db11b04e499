"""The Grafana dashboard of docs/grafana/vmfleet.json cannot drift from the metrics.

Every PromQL expression in it may name only series the gateway's and the worker's metrics
modules really export (built here on fresh registries), filter and group only by labels
those metrics have (plus ``host``, which the scrape configuration adds, see
docs/monitoring.md), and every metric the modules define appears in some panel. The alert
rules of docs/monitoring.md are held to the same rules (they may also use Prometheus's
own ``up``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from gateway.metrics import GatewayMetrics
from worker.metrics import WorkerMetrics

DOCS = Path(__file__).parents[2] / "docs"
DASHBOARD = DOCS / "grafana" / "vmfleet.json"
MONITORING = DOCS / "monitoring.md"
#: Labels Prometheus attaches to every scraped series (``host`` by the scrape config).
TARGET_LABELS = frozenset({"host", "instance", "job"})
#: The series each metric type exports, by suffix.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series name the two modules export → (its family, the family's labels)."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for build in (GatewayMetrics, WorkerMetrics):
        holder = build(CollectorRegistry())
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            (family,) = metric.describe()
            labels = frozenset(metric._labelnames)  # no public accessor; stable for years
            if family.type == "histogram":
                labels |= {"le"}
            for suffix in _SUFFIXES[family.type]:
                found[family.name + suffix] = (family.name, labels)
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, $__rate_interval
    text = _GROUPING.sub(" ", text)  # by (label, ...)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before in "$.0123456789":  # a variable, or part of a number such as 1e3
            continue
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """The labels an expression matches on or groups by."""
    text = _STRING.sub('""', expr)
    used = {m for _, body in _SELECTOR.findall(text) for m in _MATCHER_LABEL.findall(body)}
    for group in _GROUPING.findall(text):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    return used


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _expressions() -> list[tuple[str, str]]:
    """(panel title, expr) of every query, the template variables' included."""
    dashboard = _dashboard()
    found = [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert inner, variable["definition"]
            found.append((f"${variable['name']}", inner.group(1)))
    return found


def test_the_name_extractor_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (op, le) (rate(a_bucket{host=~"$host", x="b{c}"}'
        "[$__rate_interval]))) / ignoring (op) sum(b_total offset 5m) * 1e3 and on() up"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up"}
    assert label_names(expr) == {"op", "le", "host", "x"}


def test_every_query_names_only_exported_series_and_their_labels() -> None:
    exported = _metrics()
    expressions = _expressions()
    assert len(expressions) > 10
    for title, expr in expressions:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        unknown = names - exported.keys()
        assert not unknown, f"{title}: {sorted(unknown)} are not exported by vmfleet"
        allowed = TARGET_LABELS.union(*(exported[name][1] for name in names))
        assert label_names(expr) <= allowed, f"{title}: {label_names(expr) - allowed} in {expr}"


def test_every_metric_has_a_panel() -> None:
    families = {family for family, _ in _metrics().values()}
    shown = {_metrics()[n][0] for _, expr in _expressions() for n in metric_names(expr)}
    assert families - shown == set(), "metrics no panel shows"


def test_quantiles_are_taken_over_buckets_by_le() -> None:
    for title, expr in _expressions():
        for inner in re.findall(r"histogram_quantile\(\s*0?\.\d+\s*,(.*)\)", expr):
            assert all(name.endswith("_bucket") for name in metric_names(inner)), title
            assert "le" in label_names(inner), title


def test_datasource_and_host_are_template_variables() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["host"]["includeAll"] and variables["host"]["allValue"] == ".*"
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'host=~"$host"' in target["expr"], panel["title"]


def test_the_alert_rules_name_exported_series() -> None:
    exported = _metrics()
    blocks = re.findall(r"```yaml\n(.*?)```", MONITORING.read_text(), re.DOTALL)
    rules = [
        rule
        for block in blocks
        for group in (yaml.safe_load(block) or {}).get("groups", [])
        for rule in group["rules"]
    ]
    assert len(rules) > 5
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names - exported.keys() <= {"up"}, rule["alert"]
        allowed = TARGET_LABELS.union(*(exported[n][1] for n in names if n in exported))
        assert label_names(rule["expr"]) <= allowed, rule["alert"]


@pytest.mark.parametrize("expr", ["rate(vmfleet_gateway_requests[5m])", "nope_total"])
def test_a_wrong_name_would_be_caught(expr: str) -> None:
    assert metric_names(expr) - _metrics().keys()
