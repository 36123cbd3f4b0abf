"""What the ``ray-monitor`` command line prints: numbers formatted to be read at a glance,
tables laid out as ``kubectl get`` does, and JSON that is always valid.

Runs in the CLI (and in examples that print what the monitor sees). Pure functions of the
data the monitor's API returns; nothing here talks to a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Optional, Sequence, TextIO

__all__ = ["TRACE_ERROR_WIDTH", "alerts_table", "clean", "compare_table", "deployments_table",
           "format_age", "format_ms", "format_percent", "format_rate", "format_value",
           "gpu_nodes", "gpus_table", "hints_table", "print_json", "render_table", "sort_alerts",
           "streams_table", "tenants_text", "traces_table"]

_STATE_ORDER = {"firing": 0, "pending": 1, "resolved": 2}


def format_age(seconds: Optional[float]) -> str:
    """Elapsed time the way ``kubectl`` prints an age: ``42s``, ``3m12s``, ``2h5m``, ``1d3h``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))  # a clock slightly behind the aggregator's reads as 0s
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


def format_rate(per_s: Optional[float]) -> str:
    """Requests per second: ``0``, ``<0.01``, ``0.25``, ``12.4``, ``1530``."""
    if per_s is None:
        return "-"
    if per_s == 0:
        return "0"
    if per_s < 0.01:
        return "<0.01"
    return f"{per_s:.2f}" if per_s < 10 else f"{per_s:.1f}" if per_s < 100 else f"{per_s:.0f}"


def format_percent(ratio: Optional[float]) -> str:
    """A ratio as a percentage: 0.005 -> ``0.50%``, 0.125 -> ``12.5%``."""
    if ratio is None:
        return "-"
    if ratio == 0:
        return "0%"
    pct = ratio * 100
    if pct < 0.01:
        return "<0.01%"
    return f"{pct:.2f}%" if pct < 10 else f"{pct:.1f}%"


def format_ms(seconds: Optional[float]) -> str:
    """Seconds as milliseconds: 0.00045 -> ``0.45``, 0.0123 -> ``12.3``, 0.85 -> ``850``."""
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def format_value(v: Optional[float]) -> str:
    """An alert's value, four significant digits: ``1.234``, ``0.0625``, ``3``."""
    return "-" if v is None else f"{v:.4g}"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, as ``kubectl get`` prints them."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def clean(obj: Any) -> Any:
    """JSON-safe: dataclasses as dicts, non-finite floats as null (JSON has no Infinity)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return clean(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(out: TextIO, data: Any, *, compact: bool = False) -> None:
    """``data`` as sorted JSON: indented, or one line a document (``--watch``)."""
    if compact:
        out.write(json.dumps(clean(data), sort_keys=True, default=str) + "\n")
    else:
        out.write(json.dumps(clean(data), sort_keys=True, indent=2, default=str) + "\n")


def _labels_text(labels: Mapping[str, str]) -> str:
    # alertname is the ALERT column already
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "alertname") or "-"


def _state_since(alert: Mapping[str, Any]) -> Optional[float]:
    """When the alert entered its current state."""
    key = {"firing": "fired_at", "resolved": "resolved_at"}.get(alert.get("state"), "active_at")
    return alert.get(key) or alert.get("active_at")


def _ago(t: Optional[float], now: float) -> str:
    return "-" if t is None else f"{format_age(now - t)} ago"


def sort_alerts(alerts: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Firing first, then pending, then resolved; by name and labels within each."""
    return sorted(alerts, key=lambda a: (_STATE_ORDER.get(a.get("state"), 9), a.get("name", ""),
                                         _labels_text(a.get("labels") or {})))


def deployments_table(deployments: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for d in deployments:
        inflight = d.get("inflight")
        rows.append([d.get("application", "-"), d.get("deployment", "-"), d.get("replicas", 0),
                     ",".join(d.get("model_versions") or ()) or "-",
                     format_rate(d.get("rate_per_s")), format_percent(d.get("error_ratio")),
                     format_ms(d.get("p50_s")), format_ms(d.get("p99_s")),
                     "-" if inflight is None else round(inflight)])
    return render_table(["APPLICATION", "DEPLOYMENT", "REPLICAS", "VERSIONS", "RATE/S", "ERRORS",
                         "P50(ms)", "P99(ms)", "IN-FLIGHT"], rows)


def tenants_text(tenants: Iterable[Mapping[str, Any]]) -> str:
    """The heaviest tenants of a deployment: ``acme:120(4.1k)`` is 120 requests and 4,100
    output tokens in the last minute."""
    out = []
    for t in tenants:
        n, tok = t.get("requests"), t.get("output_tokens")
        tail = f"({_count(tok)})" if tok else ""
        out.append(f"{t.get('tenant', '?')}:{_count(n)}{tail}")
    return ",".join(out) or "-"


def _count(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.0f}"


def streams_table(deployments: Iterable[Mapping[str, Any]]) -> str:
    """TTFT, TPOT, queue time, tokens/s and top tenants of the deployments that streamed (with a
    ``stream`` entry); tokens/s is items/s, marked ``items``, where no usage was seen."""
    rows = []
    for d in deployments:
        s = d.get("stream")
        if not s:
            continue
        tps = s.get("tokens_per_s")
        rate = format_rate(tps) if tps is not None else f"{format_rate(s.get('items_per_s'))} items"
        rows.append([d.get("application", "-"), d.get("deployment", "-"),
                     format_ms(s.get("ttft_p50_s")), format_ms(s.get("ttft_p95_s")),
                     format_ms(s.get("tpot_p50_s")), format_ms(s.get("tpot_p95_s")),
                     format_ms(s.get("queue_p50_s")), format_ms(s.get("queue_p95_s")), rate,
                     tenants_text(s.get("top_tenants") or ())])
    return render_table(["APPLICATION", "DEPLOYMENT", "TTFT-P50(ms)", "TTFT-P95(ms)",
                         "TPOT-P50(ms)", "TPOT-P95(ms)", "QUEUE-P50(ms)", "QUEUE-P95(ms)",
                         "TOKENS/S", "TOP TENANTS"], rows)


def alerts_table(alerts: Iterable[Mapping[str, Any]], now: float, *, state: bool = True,
                 summary: bool = True) -> str:
    headers = ["ALERT"] + (["STATE"] if state else []) + ["LABELS", "SINCE", "VALUE"] + (
        ["SUMMARY"] if summary else [])
    rows = []
    for a in sort_alerts(alerts):
        row = [a.get("name", "-")] + ([a.get("state", "-")] if state else []) + [
            _labels_text(a.get("labels") or {}), _ago(_state_since(a), now),
            format_value(a.get("value"))]
        if summary:
            row.append((a.get("annotations") or {}).get("summary", "") or "-")
        rows.append(row)
    return render_table(headers, rows)


def _because(reason: Mapping[str, Any]) -> str:
    """One reason of a hint (see ``hints.Hint.to_dict``) in a few words."""
    src = reason.get("source")
    if src == "rule":
        how = f"+{reason['step']}" if reason.get("step") else f"x{reason.get('factor')}"
        return f"rule {reason.get('name')} ({how})"
    if src == "target":
        return (f"target {reason.get('metric')}={format_value(reason.get('value'))}"
                f" (want {format_value(reason.get('target'))})")
    if src == "stabilization":
        return f"holding {reason.get('desired')} for {format_age(reason.get('window_s'))}"
    return str(src or reason)


def hints_table(hints: Iterable[Mapping[str, Any]]) -> str:
    """Autoscaling hints: the desired replicas per deployment and the reasons behind them."""
    rows = []
    for h in hints:
        reasons = h.get("reasons") or ()
        because = "; ".join(_because(r) for r in reasons) if reasons else h.get("reason", "-")
        desired = h.get("desired")
        rows.append([h.get("application", "-"), h.get("deployment", "-"), h.get("current", "-"),
                     "-" if desired is None else desired, h.get("apply", "policy"), because])
    return render_table(["APPLICATION", "DEPLOYMENT", "REPLICAS", "DESIRED", "APPLY", "BECAUSE"],
                        rows)


def gpu_nodes(gpus: Any) -> list[dict]:
    """``Monitor.gpus()`` as a list of snapshot dicts, from a node->snapshot mapping or a list."""
    nodes = list(gpus.values()) if isinstance(gpus, Mapping) else list(gpus or ())
    return [clean(n) for n in nodes]


def gpus_table(nodes: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for node in nodes:
        name = str(node.get("node_id", "-"))[:12]
        if not node.get("devices"):
            rows.append([name, "-", f"no GPUs: {node.get('no_gpus_reason') or 'none found'}",
                         "-", "-", "-", "-", "-"])
            continue
        for dev in node["devices"]:
            v = dev.get("values") or {}
            used, total = v.get("memory_used_bytes"), v.get("memory_total_bytes")
            replicas = sorted({(p.get("replica") or {}).get("replica") for p in node.get("processes") or ()
                               if p.get("gpu_index") == dev.get("index") and p.get("replica")})
            rows.append([
                name, dev.get("index", "-"), dev.get("model", "-") + (" (lost)" if dev.get("lost") else ""),
                format_percent(v.get("utilization_ratio")),
                "-" if used is None or total is None else f"{used / 2**30:.1f}/{total / 2**30:.1f}GiB",
                "-" if v.get("power_watts") is None else f"{v['power_watts']:.0f}W",
                "-" if v.get("temperature_celsius") is None else f"{v['temperature_celsius']:.0f}C",
                ",".join(replicas) or "-"])
    return render_table(["NODE", "GPU", "MODEL", "UTIL", "MEMORY", "POWER", "TEMP", "REPLICAS"], rows)


#: Characters of a trace's error shown in the table (``--json`` has all of it).
TRACE_ERROR_WIDTH = 60


def traces_table(traces: Iterable[Mapping[str, Any]], now: float) -> str:
    """Kept traces, one a line: when, id, kind, where, root span, duration, spans, error."""
    rows = []
    for t in traces:
        error = t.get("error") or "-"
        if len(error) > TRACE_ERROR_WIDTH:
            error = error[:TRACE_ERROR_WIDTH - 3] + "..."
        rows.append([_ago(t.get("start"), now), t.get("trace_id", "-"),
                     ",".join(t.get("kinds") or ()) or "-",
                     f"{t.get('application', '')}/{t.get('deployment', '')}", t.get("root", "-"),
                     format_ms(t.get("duration_s")), t.get("span_count", 0), error])
    return render_table(["WHEN", "TRACE", "KIND", "APPLICATION/DEPLOYMENT", "ROOT", "DURATION(ms)",
                         "SPANS", "ERROR"], rows)


_COMPARE_LABELS = {"rate_per_s": "rate/s", "error_ratio": "error ratio", "p50_s": "p50 (ms)",
                   "p95_s": "p95 (ms)", "p99_s": "p99 (ms)", "accuracy": "accuracy",
                   "label_coverage": "label coverage", "f1": "f1 (macro)", "roc_auc": "roc auc",
                   "mae": "mae", "rmse": "rmse"}
_LATENCY_ROWS = ("p50_s", "p95_s", "p99_s")
_RATIO_ROWS = ("error_ratio", "accuracy", "label_coverage")


def _compare_cell(metric: str, v: Optional[float], n: Optional[int] = None,
                  interval: Optional[Sequence[float]] = None) -> str:
    if v is None:
        return "-"
    if metric in _LATENCY_ROWS:
        text = format_ms(v)
        if interval:
            text += f" [{format_ms(interval[0])}, {format_ms(interval[1])}]"
        return text
    if metric == "rate_per_s":
        return format_rate(v)
    text = format_percent(v) if metric in _RATIO_ROWS else format_value(v)
    return text + (f" (n={n})" if n is not None else "")


def compare_table(report: Mapping[str, Any]) -> str:
    """The rows of ``Monitor.compare`` as a table: both values, the difference, the test."""
    a, b = report["versions"]
    rows = []
    for r in report["rows"]:
        m = r["metric"]
        diff = r.get("difference")
        if diff is None:
            diff_text = "-"
        elif m in _LATENCY_ROWS:
            diff_text = f"{diff * 1000:+.3g}ms"
        elif m in _RATIO_ROWS:
            diff_text = f"{diff * 100:+.3g}pp"
        else:
            diff_text = f"{diff:+.4g}"
        p = r.get("p_value")
        test = "-" if r.get("test") is None else (f"p={p:.2g}" if p is not None else "intervals")
        sig = {True: "yes", False: "no", None: "-"}[r.get("significant")]
        rows.append([_COMPARE_LABELS.get(m, m),
                     _compare_cell(m, r.get("a"), r.get("a_n"), r.get("a_interval")),
                     _compare_cell(m, r.get("b"), r.get("b_n"), r.get("b_interval")),
                     diff_text, test, sig])
    return render_table(["METRIC", a, b, "DIFFERENCE", "TEST", "SIGNIFICANT"], rows)
