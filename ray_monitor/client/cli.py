"""The ``ray-monitor`` command line: start, stop, status, alerts, traces, rule files,
dashboard, compare.

Each command is a function ``(args, *, out, ...)`` whose seams (``connect``,
``start``, ``stop``, ``clock``, ``sleep``) are injectable, so tests drive it with a
fake monitor and no Ray. Exit codes: 0 done, 1 an input was refused (a bad rule
file), 2 a usage error (argparse's), 3 no monitor or no Ray cluster to talk to.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_MONITOR = 0, 1, 2, 3
ALERT_STATES = ("firing", "pending", "all")
_STATE_ORDER = {"firing": 0, "pending": 1, "resolved": 2}


class NoCluster(RuntimeError):
    """No Ray cluster answers at the address given."""


# ------------------------------------------------------------------------ formatting

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


def _clean(obj: Any) -> Any:
    """JSON-safe: dataclasses as dicts, non-finite floats as null (JSON has no Infinity)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _clean(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _print_json(out: TextIO, data: Any, *, compact: bool = False) -> None:
    if compact:
        out.write(json.dumps(_clean(data), sort_keys=True, default=str) + "\n")
    else:
        out.write(json.dumps(_clean(data), sort_keys=True, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------- tables

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


def _gpu_nodes(gpus: Any) -> list[dict]:
    """``Monitor.gpus()`` as a list of snapshot dicts, from a node->snapshot mapping or a list."""
    nodes = list(gpus.values()) if isinstance(gpus, Mapping) else list(gpus or ())
    return [_clean(n) for n in nodes]


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


# ------------------------------------------------------------------------- the cluster

def _init_ray(address: str) -> None:
    """Attach to an existing cluster; never start a throwaway local one (the monitor's
    detached actors would die with this process)."""
    import logging

    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise NoCluster(f"no Ray cluster at {address!r} ({exc}); start one with `ray start "
                        "--head` or pass --address / set RAY_ADDRESS") from None


def _connect(args, connect: Optional[Callable[[], Any]]):
    if connect is None:
        import ray_monitor

        _init_ray(args.address)
        connect = ray_monitor.connect
    return connect()


def _load_checked(path: str):
    from ray_monitor.alerting.rules import load_rules

    return load_rules(Path(path), filename=path)  # raises RuleError naming file, rule and field


# ---------------------------------------------------------------------------- commands

def cmd_start(args, *, start: Optional[Callable[..., Any]] = None, out: TextIO = sys.stdout) -> int:
    ruleset = _load_checked(args.rules) if args.rules else None  # refused before any cluster work
    if start is None:
        import ray_monitor

        _init_ray(args.address)
        start = ray_monitor.start
    options = {k: getattr(args, k) for k in ("host", "port", "token") if getattr(args, k) is not None}
    monitor = start(rules=Path(args.rules) if args.rules else None, **options)
    info = {"url": monitor.url, "metrics_url": monitor.metrics_url, "rules_file": args.rules,
            "rules": None if ruleset is None else sum(1 for _ in ruleset.rules())}
    if args.json:
        _print_json(out, info)
        return EXIT_OK
    out.write(f"ray-monitor is running at {info['url']}\n")
    out.write(f"  metrics: {info['metrics_url']}\n")
    if ruleset is not None:
        out.write(f"  rules:   {args.rules} ({info['rules']} rules)\n")
    return EXIT_OK


def cmd_stop(args, *, stop: Optional[Callable[[], bool]] = None, out: TextIO = sys.stdout) -> int:
    if stop is None:
        import ray_monitor

        _init_ray(args.address)
        stop = ray_monitor.stop
    # Stopping what is already stopped succeeds, as `ray stop` does: scripts stay simple.
    out.write("ray-monitor stopped\n" if stop() else "no ray-monitor was running\n")
    return EXIT_OK


def cmd_status(args, *, connect: Optional[Callable[[], Any]] = None, out: TextIO = sys.stdout,
               clock: Callable[[], float] = time.time) -> int:
    monitor = _connect(args, connect)
    deployments, alerts, hints = monitor.deployments(), monitor.alerts(), monitor.hints()
    # GPU hook: Monitor may gain gpus(); older monitors lack it and the section is left out.
    gpus_fn = getattr(monitor, "gpus", None)
    gpus = _gpu_nodes(gpus_fn()) if callable(gpus_fn) else None
    firing = [a for a in alerts if a.get("state") == "firing"]
    pending = sum(1 for a in alerts if a.get("state") == "pending")
    if args.json:
        _print_json(out, {"url": getattr(monitor, "url", None), "deployments": deployments,
                          "alerts": sort_alerts(firing), "pending_alerts": pending,
                          "hints": hints, "gpus": gpus})
        return EXIT_OK
    now = clock()
    out.write(f"ray-monitor at {getattr(monitor, 'url', '?')}\n\n")
    out.write(f"DEPLOYMENTS ({len(deployments)}, last 1m)\n")
    out.write((deployments_table(deployments) if deployments else
               "No deployment has reported yet; decorate deployments with @monitor.") + "\n\n")
    more = f"; {pending} pending, see `ray-monitor alerts`" if pending else ""
    out.write(f"FIRING ALERTS ({len(firing)}{more})\n")
    out.write((alerts_table(firing, now, state=False, summary=False) if firing else
               "No alert is firing.") + "\n")
    if hints:
        out.write(f"\nAUTOSCALING HINTS ({len(hints)})\n{hints_table(hints)}\n")
    if gpus is not None:
        out.write(f"\nGPUS\n{gpus_table(gpus) if gpus else 'No GPU has reported.'}\n")
    return EXIT_OK


def cmd_alerts(args, *, connect: Optional[Callable[[], Any]] = None, out: TextIO = sys.stdout,
               clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
               max_rounds: Optional[int] = None) -> int:
    """One table, or with ``--watch`` a fresh one every ``--interval`` seconds until
    Ctrl-C or ``max_rounds`` (for tests) rounds."""
    monitor = _connect(args, connect)
    rounds = 0
    try:
        while True:
            alerts = [a for a in monitor.alerts() if args.state == "all" or a.get("state") == args.state]
            now = clock()
            if args.json:
                _print_json(out, sort_alerts(alerts), compact=args.watch)
            else:
                if args.watch:
                    if out.isatty():
                        out.write("\033[H\033[2J")  # clear the screen, as watch(1) does
                    out.write(f"Every {args.interval:g}s at {time.strftime('%H:%M:%S', time.localtime(now))}"
                              " (Ctrl-C to stop)\n")
                out.write((alerts_table(alerts, now) if alerts else
                           f"No {'' if args.state == 'all' else args.state + ' '}alerts.") + "\n")
            out.flush()
            rounds += 1
            if not args.watch or (max_rounds is not None and rounds >= max_rounds):
                return EXIT_OK
            sleep(args.interval)
    except KeyboardInterrupt:
        out.write("\n")
        return EXIT_OK


def cmd_traces(args, *, connect: Optional[Callable[[], Any]] = None, out: TextIO = sys.stdout,
               clock: Callable[[], float] = time.time) -> int:
    kind = "slow" if args.slow else "errors" if args.errors else None
    traces = _connect(args, connect).traces(kind=kind, limit=args.limit)
    if args.json:
        _print_json(out, traces)
        return EXIT_OK
    what = {"slow": "slow", "errors": "failed", None: "slow or failed"}[kind]
    if not traces:
        out.write(f"No {what} requests kept yet. A request that fails, or takes at least its "
                  "deployment's slow_threshold_s, shows here within seconds.\n")
        return EXIT_OK
    out.write(f"{what.upper()} TRACES ({len(traces)}, newest first; --json for their spans)\n")
    out.write(traces_table(traces, clock()) + "\n")
    return EXIT_OK


def cmd_rules_check(args, *, out: TextIO = sys.stdout) -> int:
    from ray_monitor.alerting.rules import RuleError

    results, failed = [], False
    for file in args.files:
        try:
            ruleset = _load_checked(file)
        except RuleError as exc:
            failed = True
            results.append({"file": file, "ok": False, "message": str(exc),
                            "problems": [dataclasses.asdict(p) for p in exc.problems]})
            continue
        results.append({"file": file, "ok": True, "rules": sum(1 for _ in ruleset.rules()),
                        "groups": len(ruleset.groups)})
    if args.json:
        _print_json(out, results)
    else:
        for r in results:
            out.write(f"{r['file']}: OK ({r['rules']} rules in {r['groups']} groups)\n" if r["ok"]
                      else r["message"] + "\n")
    return EXIT_REFUSED if failed else EXIT_OK


def cmd_rules_export(args, *, out: TextIO = sys.stdout) -> int:
    from ray_monitor.alerting.rules import export_prometheus_yaml

    text = export_prometheus_yaml(_load_checked(args.file))
    if args.output in (None, "-"):
        out.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        out.write(f"wrote {args.output}\n")
    return EXIT_OK


def cmd_rules_reload(args, *, connect: Optional[Callable[[], Any]] = None,
                     out: TextIO = sys.stdout) -> int:
    ruleset = _load_checked(args.file)  # refused here, before the monitor sees it
    result = _connect(args, connect).reload(Path(args.file))
    if args.json:
        _print_json(out, {"file": args.file, **result})
    else:
        n = result.get("rules", sum(1 for _ in ruleset.rules()))
        out.write(f"{args.file}: reloaded ({n} rules)\n")
    return EXIT_OK


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


def cmd_compare(args, *, connect: Optional[Callable[[], Any]] = None,
                out: TextIO = sys.stdout) -> int:
    from ray_monitor.quality.store import ALPHA
    from ray_monitor.common.durations import format_duration

    report = _connect(args, connect).compare(args.deployment, tuple(args.versions),
                                             application=args.application, window_s=args.window)
    if args.json:
        _print_json(out, report)
        return EXIT_OK
    where = f"application {args.application}" if args.application else "all applications"
    out.write(f"{args.deployment}: {args.versions[0]} vs {args.versions[1]} ({where}, last "
              f"{format_duration(report['window_s'])})\n")
    out.write(compare_table(report) + "\n")
    out.write(f"Significant: error ratio and accuracy by a two-sided two-proportion z-test "
              f"(p < {ALPHA:g}); latency quantiles when their {1 - ALPHA:.0%} order-statistic "
              "intervals, shown in brackets and widened by the histogram's error, do not "
              "overlap. Other rows are shown without a test.\n")
    return EXIT_OK


def cmd_dashboard_export(args, *, out: TextIO = sys.stdout) -> int:
    from ray_monitor.client.dashboard import dashboard_json

    text = dashboard_json(title=args.title, uid=args.uid)
    if args.output in (None, "-"):
        out.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        out.write(f"wrote {args.output}\n")
    return EXIT_OK


# ------------------------------------------------------------------------------ parser

def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds above 0")
    return v


def _window(text: str) -> float:
    from ray_monitor.common.durations import parse_duration

    try:
        v = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write it like 10m or 1h") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return v


def _trace_limit(text: str) -> int:
    from ray_monitor.aggregator.trace_store import MAX_LIMIT

    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; use 1 to {MAX_LIMIT}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; use 0 to 65535 (0: any free port)")
    return int(text)


def _dashboard_uid(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Grafana uid; use 1 to 40 letters, "
                                         "digits, '-' or '_'")
    return text


def build_parser() -> argparse.ArgumentParser:
    from ray_monitor import __version__

    parser = argparse.ArgumentParser(
        prog="ray-monitor", description="Monitoring for Ray Serve: status, alerts, traces and alert rules.",
        epilog="Exit codes: 0 done, 1 input refused, 2 usage error, 3 no monitor or no Ray cluster.")
    parser.add_argument("--version", action="version", version=f"ray-monitor {__version__}")
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                         help="Ray cluster address (default: $RAY_ADDRESS or auto)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("start", parents=[cluster, as_json], help="start (or find) the cluster's monitor")
    p.add_argument("--rules", metavar="FILE", help="alert rule file (YAML)")
    p.add_argument("--host", help="address the HTTP server binds (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default 8266; 0: any free port)")
    p.add_argument("--token", help="bearer token for writes (default: $RAY_MONITOR_TOKEN)")
    p.set_defaults(run="start")
    sub.add_parser("stop", parents=[cluster], help="stop the monitor").set_defaults(run="stop")
    sub.add_parser("status", parents=[cluster, as_json],
                   help="deployments, firing alerts, hints and GPUs").set_defaults(run="status")

    p = sub.add_parser("alerts", parents=[cluster, as_json], help="alerts and their state")
    p.add_argument("--state", choices=ALERT_STATES, default="all", help="which alerts (default all)")
    p.add_argument("--watch", "-w", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=_positive_float, default=2.0, metavar="S",
                   help="seconds between refreshes with --watch (default 2)")
    p.set_defaults(run="alerts")

    p = sub.add_parser("traces", parents=[cluster, as_json],
                       help="the traces of slow and failed requests the monitor keeps")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--slow", action="store_true", help="only slow requests")
    kind.add_argument("--errors", action="store_true", help="only failed requests")
    p.add_argument("--limit", type=_trace_limit, default=20, metavar="N",
                   help="newest N traces (default 20)")
    p.set_defaults(run="traces")

    rules = sub.add_parser("rules", help="check, export or reload alert rule files")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="COMMAND")
    p = rsub.add_parser("check", parents=[as_json], help="check rule files; no cluster needed")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run="rules_check")
    p = rsub.add_parser("export", help="print the equivalent Prometheus rule file; no cluster needed")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    p.set_defaults(run="rules_export")
    p = rsub.add_parser("reload", parents=[cluster, as_json], help="send a rule file to the running monitor")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(run="rules_reload")

    p = sub.add_parser("compare", parents=[cluster, as_json],
                       help="two model versions side by side, with significance tests")
    p.add_argument("--deployment", required=True, help="the deployment both versions serve")
    p.add_argument("--versions", nargs=2, required=True, metavar=("A", "B"),
                   help="the two model_version values to compare")
    p.add_argument("--application", help="only this application (default: all of them)")
    p.add_argument("--window", type=_window, default=600.0, metavar="DURATION",
                   help="how far back to look (default 10m)")
    p.set_defaults(run="compare")

    from ray_monitor.client.dashboard import DEFAULT_TITLE, DEFAULT_UID

    dashboard = sub.add_parser("dashboard", help="Grafana dashboard for the metrics on /metrics")
    dsub = dashboard.add_subparsers(dest="dashboard_command", required=True, metavar="COMMAND")
    p = dsub.add_parser("export", help="print the Grafana dashboard JSON; no cluster needed")
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    p.add_argument("--title", default=DEFAULT_TITLE, help=f"dashboard title (default {DEFAULT_TITLE!r})")
    p.add_argument("--uid", type=_dashboard_uid, default=DEFAULT_UID, help=f"dashboard uid (default {DEFAULT_UID!r})")
    p.set_defaults(run="dashboard_export")
    return parser


def main(argv: Optional[Sequence[str]] = None, *, connect: Optional[Callable[[], Any]] = None,
         start: Optional[Callable[..., Any]] = None, stop: Optional[Callable[[], bool]] = None,
         out: Optional[TextIO] = None, err: Optional[TextIO] = None,
         clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> int:
    """Runs one command and returns its exit code; the seams default to the real monitor."""
    from ray_monitor.client.api import MonitorNotRunning
    from ray_monitor.alerting.rules import RuleError

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    commands: dict[str, Callable[[], int]] = {
        "start": lambda: cmd_start(args, start=start, out=out),
        "stop": lambda: cmd_stop(args, stop=stop, out=out),
        "status": lambda: cmd_status(args, connect=connect, out=out, clock=clock),
        "alerts": lambda: cmd_alerts(args, connect=connect, out=out, clock=clock, sleep=sleep),
        "traces": lambda: cmd_traces(args, connect=connect, out=out, clock=clock),
        "rules_check": lambda: cmd_rules_check(args, out=out),
        "rules_export": lambda: cmd_rules_export(args, out=out),
        "rules_reload": lambda: cmd_rules_reload(args, connect=connect, out=out),
        "dashboard_export": lambda: cmd_dashboard_export(args, out=out),
        "compare": lambda: cmd_compare(args, connect=connect, out=out),
    }
    try:
        return commands[args.run]()
    except (MonitorNotRunning, NoCluster) as exc:
        err.write(f"ray-monitor: {exc}\n")
        return EXIT_NO_MONITOR
    except (RuleError, FileNotFoundError) as exc:
        err.write(f"{exc}\n")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
