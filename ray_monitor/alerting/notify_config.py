"""The ``notifications:`` section: where alerts go (Alertmanager, webhooks, Slack, email)
and how webhook, Slack and email receivers group them (the route).

Checked where it is given: ``ray_monitor.start(notifications=...)`` in the driver, or the
rule file's ``notifications:`` section wherever the file is read; built again in the
aggregator, which sends. Every problem is reported at once, as a
:class:`~ray_monitor.common.errors.ConfigError` naming each field by its path
(``notifications.webhooks[0].url``). A kind of receiver the section does not mention
comes from the environment (``RAY_MONITOR_ALERTMANAGER_URL``, ``RAY_MONITOR_WEBHOOK_URL``,
``RAY_MONITOR_SLACK_WEBHOOK_URL``); a bad value there is logged once and ignored.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from ray_monitor.common import env as environment
from ray_monitor.common.durations import parse_seconds
from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["AlertmanagerReceiver", "EmailReceiver", "NotifyConfig", "Route", "SlackReceiver",
           "WebhookReceiver", "parse_seconds_field"]

#: Who took the section when no rule file did: the option of ``start()``.
_SOURCE = "ray_monitor.start()"
_TOP_KEYS = ("alertmanager", "webhooks", "slack", "email", "route", "external_url")

Add = Callable[[Optional[str], str], None]  # (field path, message)


def _is_http_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _duration_problem(value: Any) -> str:
    return (f"{value!r} is not a duration; use seconds (e.g. 5) or a Prometheus duration such "
            f"as 500ms, 30s, 5m or 4h")


def parse_seconds_field(value: Any, field: str = "duration", *, file: str = _SOURCE) -> float:
    """Seconds from a number or a Prometheus duration (``500ms``, ``30s``, ``1h30m``);
    raises :class:`ConfigError` naming ``field``."""
    try:
        return parse_seconds(value)
    except ValueError:
        raise ConfigError.one(file, field, _duration_problem(value)) from None


@dataclass(frozen=True)
class Route:
    """Grouping and timing for webhook, Slack and email receivers; Alertmanager's defaults."""

    group_by: tuple[str, ...] = ("alertname",)  # ("...",) groups by every label
    group_wait: float = 30.0
    group_interval: float = 300.0
    repeat_interval: float = 14400.0


@dataclass(frozen=True)
class AlertmanagerReceiver:
    name: str
    url: str  # base URL; alerts go to {url}/api/v2/alerts
    timeout: float = 10.0


@dataclass(frozen=True)
class WebhookReceiver:
    name: str
    url: str
    timeout: float = 10.0
    send_resolved: bool = True
    max_alerts: int = 0  # 0: no limit; the rest is counted in truncatedAlerts
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SlackReceiver:
    name: str
    webhook_url: str
    channel: str = ""
    username: str = "ray-monitor"
    timeout: float = 10.0
    send_resolved: bool = True


@dataclass(frozen=True)
class EmailReceiver:
    name: str
    host: str
    port: int
    from_addr: str
    to: tuple[str, ...]
    username: str = ""
    password: str = ""
    starttls: bool = False
    timeout: float = 10.0
    send_resolved: bool = True


class _Fields:
    """One mapping of the section. Each getter checks one field; a bad one is reported
    as ``path.key`` and read as its default, so that reading goes on to the next."""

    def __init__(self, data: Mapping, path: str, add: Add):
        self.data, self.path, self._add = data, path, add

    def bad(self, key: str, message: str) -> None:
        self._add(f"{self.path}.{key}", message)

    def url(self, key: str) -> str:
        value = self.data.get(key)
        if value is None:
            self.bad(key, "required; set it to an http(s) URL")
        elif not _is_http_url(value):
            self.bad(key, f"{value!r} is not an http(s) URL; use e.g. http://127.0.0.1:9093")
        else:
            return value
        return ""

    def string(self, key: str, default: Optional[str] = None) -> str:
        """A string; required (non-empty) when there is no default."""
        value = self.data.get(key, default)
        if value is None or (default is None and value == ""):
            self.bad(key, "required; set it to a non-empty string")
        elif not isinstance(value, str):
            self.bad(key, f"{value!r} is not a string; quote it")
        else:
            return value
        return default or ""

    def name(self, default: str) -> str:
        value = self.string("name", default)
        if not value.strip():
            self.bad("name", "empty; leave it out or give a name")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if isinstance(value, bool):
            return value
        self.bad(key, f"{value!r} is not true or false")
        return default

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.data.get(key, default)
        try:
            seconds = parse_seconds(value)
        except ValueError:
            self.bad(key, _duration_problem(value))
            return default
        if positive and seconds <= 0:
            self.bad(key, "must be greater than zero")
        return seconds


def _fields(data: Any, path: str, allowed: Iterable[str], add: Add) -> Optional[_Fields]:
    """``data`` as a mapping of ``allowed`` fields, or None (reported) when it is not one."""
    if not isinstance(data, Mapping):
        add(path, f"expected a mapping, got {type(data).__name__}")
        return None
    for key in sorted(set(map(str, data)) - set(allowed)):
        add(f"{path}.{key}", f"unknown field; allowed fields are {', '.join(sorted(allowed))}")
    return _Fields(data, path, add)


def _receivers(data: Mapping, key: str, url: Optional[environment.EnvVar],
               env: Optional[Mapping[str, str]], add: Add) -> list:
    """The list under ``key``, or one receiver from the environment when the key is absent."""
    if key not in data:
        value = url.get(env) if url is not None else None  # a bad value is logged, never raised
        return [] if value is None else [{"webhook_url" if key == "slack" else "url": value}]
    items = data[key]
    if items is None:
        return []
    if not isinstance(items, list):
        add(f"notifications.{key}", f"expected a list of receivers, got {type(items).__name__}; "
            f"write it as `{key}: [{{...}}]`")
        return []
    return items


def _webhook(s: _Fields, i: int) -> WebhookReceiver:
    max_alerts = s.data.get("max_alerts", 0)
    if not isinstance(max_alerts, int) or isinstance(max_alerts, bool) or max_alerts < 0:
        s.bad("max_alerts", f"{max_alerts!r} is not a whole number >= 0 (0: no limit)")
        max_alerts = 0
    headers = s.data.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        s.bad("headers", "expected a mapping of header name to string value")
        headers = {}
    return WebhookReceiver(
        name=s.name(f"webhook-{i}"), url=s.url("url"),
        timeout=s.duration("timeout", 10.0, positive=True),
        send_resolved=s.boolean("send_resolved", True), max_alerts=max_alerts,
        headers=tuple(sorted(headers.items())))


def _email(s: _Fields, i: int) -> EmailReceiver:
    smarthost = s.string("smarthost")
    host, sep, port = smarthost.rpartition(":")
    if smarthost and (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536):
        s.bad("smarthost", f"{smarthost!r} is not host:port; use e.g. smtp.example.com:587")
        port = "0"
    to = s.data.get("to")
    to = [a.strip() for a in to.split(",")] if isinstance(to, str) else to
    if not isinstance(to, list) or not to or not all(isinstance(a, str) and "@" in a for a in to):
        s.bad("to", f"{s.data.get('to')!r} is not a non-empty list of addresses; "
              f"use e.g. [oncall@example.com]")
        to = []
    from_addr = s.string("from")
    if from_addr and "@" not in from_addr:
        s.bad("from", f"{from_addr!r} is not an email address")
    return EmailReceiver(
        name=s.name(f"email-{i}"), host=host.strip("[]"), port=int(port or 0),
        from_addr=from_addr, to=tuple(to), username=s.string("username", ""),
        password=s.string("password", ""), starttls=s.boolean("starttls", False),
        timeout=s.duration("timeout", 10.0, positive=True),
        send_resolved=s.boolean("send_resolved", True))


def _route(data: Any, add: Add) -> Route:
    r = _fields(data, "notifications.route",
                ("group_by", "group_wait", "group_interval", "repeat_interval"), add)
    if r is None:
        return Route()
    group_by = r.data.get("group_by", list(Route.group_by))
    if not isinstance(group_by, list) or not all(isinstance(g, str) and g for g in group_by):
        r.bad("group_by", f"{group_by!r} is not a list of label names; use e.g. "
              f"[alertname, deployment], or ['...'] to group by every label")
        group_by = list(Route.group_by)
    return Route(group_by=tuple(group_by),
                 group_wait=r.duration("group_wait", Route.group_wait),
                 group_interval=r.duration("group_interval", Route.group_interval, positive=True),
                 repeat_interval=r.duration("repeat_interval", Route.repeat_interval,
                                            positive=True))


@dataclass(frozen=True)
class NotifyConfig:
    alertmanager: tuple[AlertmanagerReceiver, ...] = ()
    webhooks: tuple[WebhookReceiver, ...] = ()
    slack: tuple[SlackReceiver, ...] = ()
    email: tuple[EmailReceiver, ...] = ()
    route: Route = Route()
    external_url: str = ""  # shown as externalURL in webhook payloads and linked from Slack

    @classmethod
    def from_dict(cls, data: Optional[Mapping], *, env: Optional[Mapping[str, str]] = None,
                  file: str = _SOURCE) -> "NotifyConfig":
        """Check the ``notifications:`` section (``None``: receivers from the environment
        only). ``env`` stands for ``os.environ``; ``file`` names where the section came
        from in messages. Raises :class:`ConfigError` with every problem."""
        problems: list[Problem] = []

        def add(path: Optional[str], message: str) -> None:
            problems.append(Problem(file, field=path, message=message))

        if data is not None and not isinstance(data, Mapping):
            # No field path: "notifications" itself is what is wrong, and says so first.
            raise ConfigError.one(file, None, f"notifications: expected a mapping of receivers "
                                  f"and route, got {type(data).__name__}")
        top = _fields({} if data is None else data, "notifications", _TOP_KEYS, add)
        data = top.data
        external_url = top.string("external_url", "")
        if external_url and not _is_http_url(external_url):
            top.bad("external_url", f"{external_url!r} is not an http(s) URL")

        receivers: dict[str, list] = {"alertmanager": [], "webhooks": [], "slack": [], "email": []}
        kinds = (("alertmanager", environment.ALERTMANAGER_URL, ("name", "url", "timeout")),
                 ("webhooks", environment.WEBHOOK_URL,
                  ("name", "url", "timeout", "send_resolved", "max_alerts", "headers")),
                 ("slack", environment.SLACK_WEBHOOK_URL,
                  ("name", "webhook_url", "channel", "username", "timeout", "send_resolved")),
                 ("email", None, ("name", "smarthost", "from", "to", "username", "password",
                                  "starttls", "timeout", "send_resolved")))
        for kind, url, allowed in kinds:
            for i, item in enumerate(_receivers(data, kind, url, env, add)):
                s = _fields(item, f"notifications.{kind}[{i}]", allowed, add)
                if s is not None:
                    receivers[kind].append((s.path, _receiver(kind, s, i)))
        route = _route(data.get("route") or {}, add)

        seen: set[str] = set()
        for path, r in (x for kind in receivers.values() for x in kind):
            if r.name in seen:
                add(f"{path}.name", f"receiver name {r.name!r} is used twice; give each a "
                    "unique name")
            seen.add(r.name)
        if problems:
            raise ConfigError(problems)
        return cls(**{k: tuple(r for _, r in v) for k, v in receivers.items()}, route=route,
                   external_url=external_url)


def _receiver(kind: str, s: _Fields, i: int):
    if kind == "alertmanager":
        return AlertmanagerReceiver(name=s.name(f"alertmanager-{i}"), url=s.url("url").rstrip("/"),
                                    timeout=s.duration("timeout", 10.0, positive=True))
    if kind == "webhooks":
        return _webhook(s, i)
    if kind == "slack":
        return SlackReceiver(
            name=s.name(f"slack-{i}"), webhook_url=s.url("webhook_url"),
            channel=s.string("channel", ""), username=s.string("username", "ray-monitor"),
            timeout=s.duration("timeout", 10.0, positive=True),
            send_resolved=s.boolean("send_resolved", True))
    return _email(s, i)
