"""The ``ray-monitor`` command line: start, stop, status, alerts, traces, rule files,
dashboard, compare.

Runs wherever a user types it; it parses arguments, reads rule files through the one
reader (:func:`~ray_monitor.alerting.loader.load_rule_file`) before anything touches a
cluster, and prints with :mod:`~ray_monitor.client.tables`. Each command is a function
``(args, *, out, ...)`` whose seams (``connect``, ``start``, ``stop``, ``clock``,
``sleep``) are injectable, so tests drive it with a fake monitor and no Ray. Exit codes:
0 done, 1 an input was refused (a bad rule file), 2 a usage error (argparse's), 3 no
monitor or no Ray cluster to talk to.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TextIO

from ray_monitor.client.tables import (alerts_table, compare_table, deployments_table, gpu_nodes,
                                       gpus_table, hints_table, print_json, sort_alerts,
                                       streams_table, traces_table)
from ray_monitor.common import env
from ray_monitor.common.errors import ConfigError, MonitorNotRunning

if TYPE_CHECKING:
    from ray_monitor.alerting.loader import RuleFile

__all__ = ["ALERT_STATES", "EXIT_NO_MONITOR", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "NoCluster",
           "build_parser", "cmd_alerts", "cmd_compare", "cmd_dashboard_export", "cmd_rules_check",
           "cmd_rules_export", "cmd_rules_reload", "cmd_start", "cmd_status", "cmd_stop",
           "cmd_traces", "main"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_MONITOR = 0, 1, 2, 3
ALERT_STATES = ("firing", "pending", "all")


class NoCluster(RuntimeError):
    """No Ray cluster answers at the address given."""


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


def _shards(text: str) -> int:
    from ray_monitor.common.shards import MAX_SHARDS

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_SHARDS}, "
                                         f"got {text!r}")
    return n


def _load_checked(path: str) -> "RuleFile":
    """The rule file at ``path``, every section checked; raises ``ConfigError`` naming the
    file and, for each problem, the group and rule or the deployment, and the field."""
    from ray_monitor.alerting.loader import load_rule_file

    # As given, not as a Path: 'myrules' is refused as load_rule_file refuses it anywhere.
    return load_rule_file(path)


# ---------------------------------------------------------------------------- commands

def cmd_start(args, *, start: Optional[Callable[..., Any]] = None, out: TextIO = sys.stdout) -> int:
    ruleset = _load_checked(args.rules).ruleset if args.rules else None  # before any cluster work
    if start is None:
        import ray_monitor

        _init_ray(args.address)
        start = ray_monitor.start
    options = {k: getattr(args, k) for k in ("host", "port", "token", "shards")
               if getattr(args, k, None) is not None}
    monitor = start(rules=Path(args.rules) if args.rules else None, **options)
    info = {"url": monitor.url, "metrics_url": monitor.metrics_url, "rules_file": args.rules,
            "rules": None if ruleset is None else sum(1 for _ in ruleset.rules())}
    if args.json:
        print_json(out, info)
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
    gpus = gpu_nodes(gpus_fn()) if callable(gpus_fn) else None
    firing = [a for a in alerts if a.get("state") == "firing"]
    pending = sum(1 for a in alerts if a.get("state") == "pending")
    if args.json:
        print_json(out, {"url": getattr(monitor, "url", None), "deployments": deployments,
                          "alerts": sort_alerts(firing), "pending_alerts": pending,
                          "hints": hints, "gpus": gpus})
        return EXIT_OK
    now = clock()
    out.write(f"ray-monitor at {getattr(monitor, 'url', '?')}\n\n")
    out.write(f"DEPLOYMENTS ({len(deployments)}, last 1m)\n")
    out.write((deployments_table(deployments) if deployments else
               "No deployment has reported yet; decorate deployments with @monitor.") + "\n\n")
    streaming = [d for d in deployments if d.get("stream")]
    if streaming:  # generative deployments only: the table above stays as it was
        out.write(f"STREAMS ({len(streaming)}, last 1m)\n{streams_table(streaming)}\n\n")
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
                print_json(out, sort_alerts(alerts), compact=args.watch)
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
        print_json(out, traces)
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
    """Every section of every file checked; each problem on its own line, naming the file,
    the group and rule or the deployment, and the field."""
    results, failed = [], False
    for file in args.files:
        try:
            rule_file = _load_checked(file)
            from ray_monitor.alerting.sharding import sharding_problems

            problems = sharding_problems(rule_file.ruleset, getattr(args, "shards", 1))
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            failed = True
            results.append({"file": file, "ok": False, "message": str(exc),
                            "problems": exc.as_dicts()})
            continue
        ruleset = rule_file.ruleset
        results.append({"file": file, "ok": True, "rules": sum(1 for _ in ruleset.rules()),
                        "groups": len(ruleset.groups)})
    if args.json:
        print_json(out, results)
    else:
        for r in results:
            out.write(f"{r['file']}: OK ({r['rules']} rules in {r['groups']} groups)\n" if r["ok"]
                      else r["message"] + "\n")
    return EXIT_REFUSED if failed else EXIT_OK


def cmd_rules_export(args, *, out: TextIO = sys.stdout) -> int:
    from ray_monitor.alerting.export import export_prometheus_yaml

    text = export_prometheus_yaml(_load_checked(args.file).ruleset)
    if args.output in (None, "-"):
        out.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        out.write(f"wrote {args.output}\n")
    return EXIT_OK


def cmd_rules_reload(args, *, connect: Optional[Callable[[], Any]] = None,
                     out: TextIO = sys.stdout) -> int:
    ruleset = _load_checked(args.file).ruleset  # refused here, before the monitor sees it
    result = _connect(args, connect).reload(Path(args.file))
    if args.json:
        print_json(out, {"file": args.file, **result})
    else:
        n = result.get("rules", sum(1 for _ in ruleset.rules()))
        out.write(f"{args.file}: reloaded ({n} rules)\n")
    return EXIT_OK


def cmd_compare(args, *, connect: Optional[Callable[[], Any]] = None,
                out: TextIO = sys.stdout) -> int:
    from ray_monitor.quality.compare import ALPHA
    from ray_monitor.common.durations import format_duration

    report = _connect(args, connect).compare(args.deployment, tuple(args.versions),
                                             application=args.application, window_s=args.window)
    if args.json:
        print_json(out, report)
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

def _seconds(text: str) -> float:
    """A positive number of seconds or a duration (``2``, ``500ms``, ``10m``)."""
    from ray_monitor.common.durations import parse_seconds

    try:
        v = parse_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write it like 2 (seconds), 30s, 10m or 1h") from None
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
    cluster.add_argument("--address", default=env.RAY_ADDRESS.get() or "auto",
                         help="Ray cluster address (default: $RAY_ADDRESS or auto)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("start", parents=[cluster, as_json], help="start (or find) the cluster's monitor")
    p.add_argument("--rules", metavar="FILE", help="alert rule file (YAML)")
    p.add_argument("--host", help="address the HTTP server binds (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default 8266; 0: any free port)")
    p.add_argument("--token", help="bearer token for writes (default: $RAY_MONITOR_TOKEN)")
    p.add_argument("--shards", type=_shards, metavar="N", help=(
        "aggregator actors, each owning the applications that hash to it (default 1)"))
    p.set_defaults(run="start")
    sub.add_parser("stop", parents=[cluster], help="stop the monitor").set_defaults(run="stop")
    sub.add_parser("status", parents=[cluster, as_json],
                   help="deployments, firing alerts, hints and GPUs").set_defaults(run="status")

    p = sub.add_parser("alerts", parents=[cluster, as_json], help="alerts and their state")
    p.add_argument("--state", choices=ALERT_STATES, default="all", help="which alerts (default all)")
    p.add_argument("--watch", "-w", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=_seconds, default=2.0, metavar="S",
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
    p.add_argument("--shards", type=_shards, default=1, metavar="N", help=(
        "check for a monitor sharded across N aggregators: rules that aggregate across "
        "applications are refused (default 1)"))
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
    p.add_argument("--window", type=_seconds, default=600.0, metavar="DURATION",
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
    except (ConfigError, FileNotFoundError) as exc:
        err.write(f"{exc}\n")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
