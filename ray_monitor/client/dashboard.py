"""A Grafana dashboard for ray-monitor's ``/metrics``, generated from the catalog's names.

Runs in the CLI (``ray-monitor dashboard export``); the output is checked against a live
``/metrics`` by the tests.

Every query is built from :data:`~ray_monitor.common.catalog.METRICS` (``Metric.prometheus``
plus the suffix the exposition adds: ``_total`` for counters, ``_bucket``/``_sum``/
``_count`` for histograms), so the dashboard cannot ask for a name the code does not
export; ``ray-monitor dashboard export`` writes it, and
``deployments/grafana-dashboard.json`` is its output.

The dashboard has a ``datasource`` variable (any Prometheus) and ``application`` /
``deployment`` variables that filter every request and replica panel.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from ray_monitor.common.catalog import METRICS

__all__ = ["ALERTS_METRIC", "DEFAULT_TITLE", "DEFAULT_UID", "build_dashboard", "dashboard_json",
           "exported_name", "queried_metrics"]

#: The ALERTS-like series of :mod:`ray_monitor.aggregator.exposition`.
ALERTS_METRIC = "ray_monitor_alerts"
DEFAULT_TITLE = "Ray Serve (ray-monitor)"
DEFAULT_UID = "ray-monitor"
_DS = {"type": "prometheus", "uid": "${datasource}"}
_SEL = 'application=~"$application", deployment=~"$deployment"'
_NAME_RE = re.compile(r"\bray_monitor_[A-Za-z0-9_]+\b")


def exported_name(metric: str, suffix: str = "") -> str:
    """The name on ``/metrics`` of a catalog metric's sample: ``exported_name("requests")``
    is ``ray_monitor_requests_total``; histograms take ``suffix`` ``bucket``/``sum``/``count``."""
    m = METRICS[metric]
    if m.kind == "counter":
        if suffix:
            raise ValueError(f"{metric!r} is a counter: its only sample is _total, not _{suffix}")
        return m.prometheus + "_total"
    if m.kind == "histogram":
        if suffix not in ("bucket", "sum", "count"):
            raise ValueError(f"{metric!r} is a histogram: pass suffix 'bucket', 'sum' or 'count'")
        return f"{m.prometheus}_{suffix}"
    if suffix:
        raise ValueError(f"{metric!r} is a gauge: it has no _{suffix} sample")
    return m.prometheus


def _rate(metric: str, by: str, suffix: str = "") -> str:
    return (f"sum by ({by}) (rate({exported_name(metric, suffix)}{{{_SEL}}}"
            "[$__rate_interval]))")


def _quantile(q: float, metric: str = "latency_seconds") -> str:
    return f"histogram_quantile({q}, {_rate(metric, 'le, application, deployment', 'bucket')})"


def _gpu(metric: str) -> str:
    # A GPU series exists once per deployment using it: max folds the copies into one.
    return f"max by (node, gpu) ({exported_name(metric)})"


def _target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": _DS, "expr": expr, "legendFormat": legend, "refId": ref}


def _panel(title: str, targets: list[tuple[str, str]], *, unit: str, description: str = "",
           kind: str = "timeseries", max_value: Optional[float] = None) -> dict:
    defaults: dict = {"unit": unit}
    if max_value is not None:
        defaults.update(min=0, max=max_value)
    panel = {"type": kind, "title": title, "description": description, "datasource": _DS,
             "fieldConfig": {"defaults": defaults, "overrides": []},
             "targets": [_target(e, legend, chr(ord("A") + i))
                         for i, (e, legend) in enumerate(targets)]}
    if kind == "table":  # the alerts of now, one row each, labels as columns
        for t in panel["targets"]:
            t.update(format="table", instant=True)
    else:
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel


def _rows() -> list[tuple[str, list[dict]]]:
    dep = "{{application}}/{{deployment}}"
    rep = "{{deployment}} {{replica}}"
    gpu = "{{node}} GPU {{gpu}}"
    by_dep = "application, deployment"
    return [
        ("Requests", [
            _panel("Request rate", [(_rate("requests", by_dep), dep)], unit="reqps",
                   description="Requests finished per second, every outcome."),
            # A deployment that never failed has no error series: read it as 0, not a gap.
            _panel("Error ratio",
                   [(f"({_rate('errors', by_dep)} or 0 * {_rate('requests', by_dep)}) / "
                     f"{_rate('requests', by_dep)}", dep)],
                   unit="percentunit", description="Requests that raised or answered 5xx, "
                   "as a share of all requests."),
            _panel("Latency p50 / p99", [(_quantile(0.5), f"p50 {dep}"), (_quantile(0.99), f"p99 {dep}")],
                   unit="s", description="From classic buckets derived from the exponential "
                   "histograms; the status page and rules use the exact ones."),
            _panel("In flight", [(f"sum by ({by_dep}) ({exported_name('inflight')}{{{_SEL}}})", dep)],
                   unit="short", description="Requests running in the deployment's replicas."),
        ]),
        ("Generative serving", [
            _panel("Time to first token p50 / p95",
                   [(_quantile(0.5, "first_item_seconds"), f"p50 {dep}"),
                    (_quantile(0.95, "first_item_seconds"), f"p95 {dep}")], unit="s",
                   description="Streams: from the request's start to its first item."),
            _panel("Time per output token p50 / p95",
                   [(_quantile(0.5, "time_per_output_token_seconds"), f"p50 {dep}"),
                    (_quantile(0.95, "time_per_output_token_seconds"), f"p95 {dep}")], unit="s",
                   description="Streams: (last - first item) / (output tokens - 1)."),
            _panel("Tokens per second", [(_rate("output_tokens", by_dep), f"output {dep}"),
                                         (_rate("input_tokens", by_dep), f"input {dep}")],
                   unit="short", description="Tokens of requests whose usage is known."),
            _panel("Queue time p50 / p95",
                   [(_quantile(0.5, "queue_seconds"), f"p50 {dep}"),
                    (_quantile(0.95, "queue_seconds"), f"p95 {dep}")], unit="s",
                   description="From the caller's send to the request's start in the replica "
                               "(requests whose caller sent its time)."),
            _panel("Top tenants (output tokens/s)",
                   [(f"topk(10, {_rate('tenant_output_tokens', 'application, deployment, tenant')})",
                     "{{deployment}} {{tenant}}")], unit="short",
                   description="The deployment's top tenants; the rest are 'other'."),
        ]),
        ("Replicas", [
            _panel("Replica CPU", [(f"{exported_name('cpu_percent')}{{{_SEL}}}", rep)],
                   unit="percent", description="CPU of each replica's process, percent of one core."),
            _panel("Replica memory (RSS)", [(f"{exported_name('rss_bytes')}{{{_SEL}}}", rep)],
                   unit="bytes", description="Resident memory of each replica's process."),
        ]),
        ("GPUs", [
            _panel("GPU utilization", [(_gpu("gpu_utilization"), gpu)], unit="percentunit",
                   max_value=1, description="Share of time a kernel ran."),
            _panel("GPU memory", [(_gpu("gpu_memory_used_bytes"), f"used {gpu}"),
                                  (_gpu("gpu_memory_total_bytes"), f"total {gpu}")],
                   unit="bytes"),
            _panel("GPU temperature", [(_gpu("gpu_temperature_celsius"), gpu)], unit="celsius"),
            _panel("GPU power", [(_gpu("gpu_power_watts"), gpu)], unit="watt"),
        ]),
        ("Alerts", [
            _panel("Alerts firing", [(f'sum by (alertname) ({ALERTS_METRIC}{{alertstate="firing"}})',
                                      "{{alertname}}")],
                   unit="short", description="Alerts of ray-monitor's own rules (like ALERTS)."),
            _panel("Alerts now", [(f"{ALERTS_METRIC}", "")], unit="short", kind="table",
                   description="Every pending or firing alert with its labels."),
        ]),
    ]


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": _DS,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def build_dashboard(*, title: str = DEFAULT_TITLE, uid: str = DEFAULT_UID) -> dict:
    """The dashboard as Grafana's JSON model (import it, or provision it as a file)."""
    if not title or not isinstance(title, str):
        raise ValueError("title must be a non-empty string")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid or ""):
        raise ValueError(f"uid={uid!r}: Grafana uids are 1 to 40 letters, digits, '-' or '_'")
    panels: list[dict] = []
    y = 0
    for row_title, row_panels in _rows():
        panels.append({"type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for i, p in enumerate(row_panels):
            p["gridPos"] = {"h": 8, "w": 12, "x": (i % 2) * 12, "y": y + (i // 2) * 8}
        y += ((len(row_panels) + 1) // 2) * 8
        panels.extend(row_panels)
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    app_name = exported_name("requests")
    return {
        "title": title, "uid": uid, "tags": ["ray", "ray-serve", "ray-monitor"],
        "description": "Generated by `ray-monitor dashboard export` from the metric names "
                       "ray-monitor exports.",
        "editable": True, "schemaVersion": 39, "version": 1, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "refresh": 1, "current": {}},
            _variable("application", "Application", f"label_values({app_name}, application)"),
            _variable("deployment", "Deployment",
                      f'label_values({app_name}{{application=~"$application"}}, deployment)'),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_json(**options) -> str:
    """:func:`build_dashboard` as indented JSON text, ending in a newline."""
    return json.dumps(build_dashboard(**options), indent=2) + "\n"


def queried_metrics(dashboard: dict) -> set[str]:
    """Every ``ray_monitor_*`` name the dashboard's queries and variables read."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    return {name for e in exprs for name in _NAME_RE.findall(e)}
