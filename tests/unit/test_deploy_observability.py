"""The Grafana dashboard and Prometheus rules under deploy/ stay consistent with the metrics the
pipeline actually exports (pipeline/telemetry.py, as named by the Prometheus exporter): every
query uses only known metric names and labels, the dashboard has its rows and variables, and
every alert carries what Alertmanager routing and the runbook links need."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "erp-pipeline-dashboard.json"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"

KNOWN_METRICS = frozenset({
    "messaging_client_sent_messages_total",
    "messaging_client_consumed_messages_total",
    "messaging_process_duration_seconds",
    "messaging_client_operation_duration_seconds",
    "pipeline_dead_lettered_total",
    "pipeline_retries_total",
    "pipeline_end_to_end_duration_seconds",
    "pipeline_outbox_backlog",
    "pipeline_outbox_oldest_age_seconds",
    "pipeline_relay_leader",
    "pipeline_relay_wal_retained_bytes",
    "pipeline_relay_wal_lag_bytes",
    "pipeline_parked_keys",
    "pipeline_stalled_keys",
    "pipeline_breaker_state",
    "pipeline_consumer_lag",
    "pipeline_consumer_lag_age_seconds",
})
KNOWN_LABELS = frozenset({
    "messaging_consumer_group_name", "messaging_destination_name",
    "messaging_destination_partition_id", "messaging_system", "outcome", "error_type", "tier",
    "shard", "slot", "messaging_operation_name",
    "le",  # histogram buckets
    "job", "instance",  # added by the scrape
})
ROWS = ["SLO", "Lag per group", "Consumers", "Relay"]
DATASOURCE_UID = "${datasource}"
GROUP_QUERY = (
    "label_values(messaging_client_consumed_messages_total, messaging_consumer_group_name)"
)
REQUIRED_ALERTS = {"OutboxBacklogOld", "ConsumerLagging", "DlqGrowing", "BreakerOpen",
                   "NoRelayLeader"}
RUNBOOK = "https://github.com/erp-pipeline/erp-pipeline/blob/main/docs/operations.md"
SCRAPE_TARGETS = {"relay:9000", "worker-wms:9000", "worker-crm:9000", "worker-bi:9000"}

# -- PromQL identifier extraction ------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without",
                       "on", "ignoring", "group_left", "group_right"})
_SUFFIX = re.compile(r"_(?:bucket|count|sum)$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, histogram suffixes stripped: whatever
    identifier is left once strings, label matchers, ranges, grouping clauses and dashboard
    variables are removed and that is neither a function call nor a keyword."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(_SUFFIX.sub("", name))
    return names


def label_names(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    text = _STRING.sub('""', expr)
    labels = set()
    for body in _MATCHERS.findall(text):
        labels |= set(_MATCHER_LABEL.findall(body))
    for _, body in _GROUPING.findall(text):
        labels |= {x.strip() for x in body.split(",") if x.strip()}
    return labels


@pytest.mark.parametrize(("expr", "expected"), [
    ('histogram_quantile(0.99, sum by (le, messaging_consumer_group_name) '
     '(rate(pipeline_end_to_end_duration_seconds_bucket{messaging_consumer_group_name=~"$group"}'
     '[5m])))', {"pipeline_end_to_end_duration_seconds"}),
    ('sum(rate(foo_total{outcome="failed"}[$__rate_interval])) / on (shard) bar_count',
     {"foo_total", "bar"}),
    ("absent(pipeline_relay_leader) or vector(0) offset 5m", {"pipeline_relay_leader"}),
    ("max(pipeline_outbox_oldest_age_seconds) > 6e2", {"pipeline_outbox_oldest_age_seconds"}),
])
def test_metric_name_extraction(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_label_name_extraction() -> None:
    expr = ('sum by (messaging_consumer_group_name, tier) '
            '(rate(pipeline_retries_total{outcome!="ok", shard=~"a,b"}[5m]))')
    assert label_names(expr) == {"messaging_consumer_group_name", "tier", "outcome", "shard"}


def _check_expr(expr: str, where: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - KNOWN_METRICS
    assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)} in {expr!r}"
    bad_labels = label_names(expr) - KNOWN_LABELS
    assert not bad_labels, f"{where}: unknown label(s) {sorted(bad_labels)} in {expr!r}"


# -- dashboard -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, with collapsed rows' children too."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def _charts(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard) if p["type"] != "row"]


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "erp-pipeline"
    assert dashboard["title"] == "ERP event pipeline"
    assert dashboard["schemaVersion"] >= 38


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    group = variables["group"]
    assert group["type"] == "query"
    assert group["datasource"]["uid"] == DATASOURCE_UID
    query = group["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == GROUP_QUERY


def test_dashboard_rows_in_order(dashboard: dict[str, Any]) -> None:
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ROWS
    assert all(r["collapsed"] is False for r in rows)
    assert dashboard["panels"][0]["type"] == "row", "every panel sits under a row"
    # Expanded rows keep their panels at the top level, between this row and the next.
    assert all(not r.get("panels") for r in rows)
    ys = [p["gridPos"]["y"] for p in dashboard["panels"]]
    assert ys == sorted(ys), "panels are listed in layout order"


def test_dashboard_rows_have_charts(dashboard: dict[str, Any]) -> None:
    current = None
    counts: dict[str, int] = {}
    for p in dashboard["panels"]:
        if p["type"] == "row":
            current = p["title"]
            counts[current] = 0
        else:
            assert current is not None
            counts[current] += 1
    assert all(counts[r] > 0 for r in ROWS), counts


def test_panel_ids_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in _panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {ids}"


def test_panels_fit_the_grid_without_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _panels(dashboard):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_charts_are_described_and_use_the_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    charts = _charts(dashboard)
    assert charts
    for p in charts:
        assert p["type"] in {"timeseries", "stat"}, p["title"]
        assert p.get("description", "").strip(), f"{p['title']!r} has no description"
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p["datasource"].get("type", "prometheus") == "prometheus", p["title"]
        assert p["targets"], f"{p['title']!r} has no query"
        for t in p["targets"]:
            if "datasource" in t:
                assert t["datasource"]["uid"] == DATASOURCE_UID, p["title"]


def test_dashboard_queries_use_known_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for p in _charts(dashboard):
        for t in p["targets"]:
            _check_expr(t["expr"], f"panel {p['title']!r} {t['refId']}")
            used |= metric_names(t["expr"])
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            assert legend_labels <= KNOWN_LABELS, (p["title"], legend_labels)
    assert used == KNOWN_METRICS, f"never charted: {sorted(KNOWN_METRICS - used)}"


def test_breaker_panel_maps_states(dashboard: dict[str, Any]) -> None:
    [panel] = [p for p in _charts(dashboard)
               if any("pipeline_breaker_state" in t["expr"] for t in p["targets"])]
    texts = {}
    for mapping in panel["fieldConfig"]["defaults"]["mappings"]:
        if mapping["type"] == "value":
            texts |= {k: v["text"] for k, v in mapping["options"].items()}
    assert texts == {"0": "closed", "1": "half-open", "2": "open"}


# -- alerting rules --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert [g["name"] for g in data["groups"]] == ["erp-pipeline"]
    rules = data["groups"][0]["rules"]
    assert rules
    return rules  # type: ignore[no-any-return]


def test_every_rule_is_complete(rules: list[dict[str, Any]]) -> None:
    for r in rules:
        name = r.get("alert")
        assert name, f"not an alerting rule: {r}"
        assert isinstance(r.get("expr"), str) and r["expr"].strip(), name
        assert re.fullmatch(r"(\d+[smhdwy])+", str(r.get("for", ""))), name
        assert r.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert str(annotations.get(key, "")).strip(), f"{name} lacks annotations.{key}"
        assert annotations["runbook_url"] == f"{RUNBOOK}#{name.lower()}", name


def test_required_alerts_present(rules: list[dict[str, Any]]) -> None:
    names = {r["alert"] for r in rules}
    assert names >= REQUIRED_ALERTS, f"missing {sorted(REQUIRED_ALERTS - names)}"
    severities = {r["labels"]["severity"] for r in rules if r["alert"] == "OutboxBacklogOld"}
    assert severities == {"warning", "critical"}
    relay = [r["expr"] for r in rules if r["alert"] == "NoRelayLeader"]
    assert any("absent(pipeline_relay_leader)" in e for e in relay), relay


def test_rule_exprs_use_known_metrics_and_labels(rules: list[dict[str, Any]]) -> None:
    for r in rules:
        _check_expr(r["expr"], f"alert {r['alert']}")


# -- prometheus.yml --------------------------------------------------------------------------


def test_prometheus_config() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    assert "alerts.yaml" in config["rule_files"]
    for name in config["rule_files"]:
        assert (PROMETHEUS_DIR / name).is_file(), f"rule file {name} does not exist"
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval"))
        assert interval == "15s", job["job_name"]
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
    assert targets == SCRAPE_TARGETS
