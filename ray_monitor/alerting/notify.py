"""Alert notifications: Alertmanager, webhooks (payload version "4"), Slack and email.

The aggregator calls :meth:`Notifier.submit` with the rule engine's ``to_send`` list from
its evaluation loop; ``submit`` only enqueues. A background thread delivers. Alertmanager
receivers get every batch as it comes (Alertmanager groups and dedups itself, exactly as
with Prometheus). Webhook, Slack and email receivers go through an in-process
:class:`Dispatcher` that groups, waits and dedups the way an Alertmanager route does, and
whose notification log survives a restart through ``state_dict()`` / ``restore()``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
import re
import smtplib
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ray_monitor.alerting.message import AlertMessage, rfc3339

logger = logging.getLogger(__name__)

__all__ = [
    "AlertmanagerReceiver", "Dispatcher", "EmailReceiver", "Notification", "Notifier",
    "NotifyConfig", "NotifyConfigError", "Route", "SlackReceiver", "WebhookReceiver",
    "alertmanager_payload", "backoff_delay", "classify", "email_message", "group_key",
    "needs_update", "parse_duration", "slack_payload", "urllib_send", "webhook_payload",
]

ENV_ALERTMANAGER_URL = "RAY_MONITOR_ALERTMANAGER_URL"
ENV_WEBHOOK_URL = "RAY_MONITOR_WEBHOOK_URL"
ENV_SLACK_WEBHOOK_URL = "RAY_MONITOR_SLACK_WEBHOOK_URL"

# (method, url, headers, body, timeout) -> HTTP status; raises OSError on network faults.
Send = Callable[[str, str, Mapping[str, str], bytes, float], int]


class NotifyConfigError(ValueError):
    """A ``notifications:`` section that cannot work; the message names the field and the fix."""


# ---------------------------------------------------------------------------- configuration

_DURATION_RE = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(value: Any, field: str = "duration") -> float:
    """Seconds from a number or a Prometheus duration (``500ms``, ``30s``, ``1h30m``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and _DURATION_RE.match(value.strip()):
        return float(sum(int(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(value)))
    raise NotifyConfigError(
        f"{field}: {value!r} is not a duration; use seconds (e.g. 5) or a Prometheus "
        f"duration such as 500ms, 30s, 5m or 4h")


def _is_http_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


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


class _Section:
    """Reads one mapping of the config, naming ``path.key`` in every error."""

    def __init__(self, data: Any, path: str, allowed: Iterable[str]):
        if not isinstance(data, Mapping):
            raise NotifyConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(allowed))
        if unknown:
            raise NotifyConfigError(
                f"{path}.{unknown[0]}: unknown field; allowed fields are {', '.join(sorted(allowed))}")
        self.data, self.path = data, path

    def url(self, key: str, default: Optional[str] = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise NotifyConfigError(f"{self.path}.{key}: required; set it to an http(s) URL")
        if not _is_http_url(value):
            raise NotifyConfigError(
                f"{self.path}.{key}: {value!r} is not an http(s) URL; use e.g. http://127.0.0.1:9093")
        return value

    def string(self, key: str, default: Optional[str] = None) -> str:
        """A string; required (non-empty) when there is no default."""
        value = self.data.get(key, default)
        if value is None or (default is None and value == ""):
            raise NotifyConfigError(f"{self.path}.{key}: required; set it to a non-empty string")
        if not isinstance(value, str):
            raise NotifyConfigError(f"{self.path}.{key}: {value!r} is not a string; quote it")
        return value

    def name(self, default: str) -> str:
        value = self.string("name", default)
        if not value.strip():
            raise NotifyConfigError(f"{self.path}.name: empty; leave it out or give a name")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise NotifyConfigError(f"{self.path}.{key}: {value!r} is not true or false")
        return value

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = parse_duration(self.data.get(key, default), f"{self.path}.{key}")
        if positive and value <= 0:
            raise NotifyConfigError(f"{self.path}.{key}: must be greater than zero")
        return value


def _receivers(data: Mapping, key: str, env: Mapping[str, str], env_name: str) -> list:
    """The list under ``key``, or one receiver from the environment when the key is absent."""
    if key not in data:
        raw = (env.get(env_name) or "").strip() if env_name else ""
        if not raw:
            return []
        if not _is_http_url(raw):  # a bad environment value is logged, never raised
            logger.warning("%s=%r is not an http(s) URL; ignored", env_name, raw)
            return []
        return [{"webhook_url" if key == "slack" else "url": raw}]
    items = data[key]
    if items is None:
        return []
    if not isinstance(items, list):
        raise NotifyConfigError(
            f"notifications.{key}: expected a list of receivers, got {type(items).__name__}; "
            f"write it as `{key}: [{{...}}]`")
    return items


@dataclass(frozen=True)
class NotifyConfig:
    alertmanager: tuple[AlertmanagerReceiver, ...] = ()
    webhooks: tuple[WebhookReceiver, ...] = ()
    slack: tuple[SlackReceiver, ...] = ()
    email: tuple[EmailReceiver, ...] = ()
    route: Route = Route()
    external_url: str = ""  # shown as externalURL in webhook payloads and linked from Slack

    @classmethod
    def from_dict(cls, data: Optional[Mapping], *,
                  env: Optional[Mapping[str, str]] = None) -> "NotifyConfig":
        """Validate the ``notifications:`` section; URLs fall back to ``RAY_MONITOR_*`` vars."""
        env = os.environ if env is None else env
        top = _Section({} if data is None else data, "notifications",
                       ("alertmanager", "webhooks", "slack", "email", "route", "external_url"))
        data = top.data
        external_url = top.string("external_url", "")
        if external_url and not _is_http_url(external_url):
            raise NotifyConfigError(
                f"notifications.external_url: {external_url!r} is not an http(s) URL")

        ams = []
        for i, item in enumerate(_receivers(data, "alertmanager", env, ENV_ALERTMANAGER_URL)):
            s = _Section(item, f"notifications.alertmanager[{i}]", ("name", "url", "timeout"))
            ams.append(AlertmanagerReceiver(
                name=s.name(f"alertmanager-{i}"), url=s.url("url").rstrip("/"),
                timeout=s.duration("timeout", 10.0, positive=True)))

        hooks = []
        for i, item in enumerate(_receivers(data, "webhooks", env, ENV_WEBHOOK_URL)):
            s = _Section(item, f"notifications.webhooks[{i}]",
                         ("name", "url", "timeout", "send_resolved", "max_alerts", "headers"))
            max_alerts = item.get("max_alerts", 0)
            if not isinstance(max_alerts, int) or isinstance(max_alerts, bool) or max_alerts < 0:
                raise NotifyConfigError(
                    f"{s.path}.max_alerts: {max_alerts!r} is not a whole number >= 0 (0: no limit)")
            headers = item.get("headers") or {}
            if not isinstance(headers, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                raise NotifyConfigError(
                    f"{s.path}.headers: expected a mapping of header name to string value")
            hooks.append(WebhookReceiver(
                name=s.name(f"webhook-{i}"), url=s.url("url"),
                timeout=s.duration("timeout", 10.0, positive=True),
                send_resolved=s.boolean("send_resolved", True), max_alerts=max_alerts,
                headers=tuple(sorted(headers.items()))))

        slacks = []
        for i, item in enumerate(_receivers(data, "slack", env, ENV_SLACK_WEBHOOK_URL)):
            s = _Section(item, f"notifications.slack[{i}]",
                         ("name", "webhook_url", "channel", "username", "timeout", "send_resolved"))
            slacks.append(SlackReceiver(
                name=s.name(f"slack-{i}"), webhook_url=s.url("webhook_url"),
                channel=s.string("channel", ""), username=s.string("username", "ray-monitor"),
                timeout=s.duration("timeout", 10.0, positive=True),
                send_resolved=s.boolean("send_resolved", True)))

        mails = []
        for i, item in enumerate(_receivers(data, "email", env, "")):
            s = _Section(item, f"notifications.email[{i}]",
                         ("name", "smarthost", "from", "to", "username", "password", "starttls",
                          "timeout", "send_resolved"))
            host, sep, port = s.string("smarthost").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise NotifyConfigError(
                    f"{s.path}.smarthost: {item['smarthost']!r} is not host:port; "
                    f"use e.g. smtp.example.com:587")
            to = item.get("to")
            to = [a.strip() for a in to.split(",")] if isinstance(to, str) else to
            if not isinstance(to, list) or not to or not all(
                    isinstance(a, str) and "@" in a for a in to):
                raise NotifyConfigError(
                    f"{s.path}.to: {item.get('to')!r} is not a non-empty list of addresses; "
                    f"use e.g. [oncall@example.com]")
            from_addr = s.string("from")
            if "@" not in from_addr:
                raise NotifyConfigError(f"{s.path}.from: {from_addr!r} is not an email address")
            mails.append(EmailReceiver(
                name=s.name(f"email-{i}"), host=host.strip("[]"), port=int(port),
                from_addr=from_addr, to=tuple(to), username=s.string("username", ""),
                password=s.string("password", ""), starttls=s.boolean("starttls", False),
                timeout=s.duration("timeout", 10.0, positive=True),
                send_resolved=s.boolean("send_resolved", True)))

        r = _Section(data.get("route") or {}, "notifications.route",
                     ("group_by", "group_wait", "group_interval", "repeat_interval"))
        group_by = r.data.get("group_by", list(Route.group_by))
        if not isinstance(group_by, list) or not all(
                isinstance(g, str) and g for g in group_by):
            raise NotifyConfigError(
                f"notifications.route.group_by: {group_by!r} is not a list of label names; "
                f"use e.g. [alertname, deployment], or ['...'] to group by every label")
        route = Route(group_by=tuple(group_by),
                      group_wait=r.duration("group_wait", Route.group_wait),
                      group_interval=r.duration("group_interval", Route.group_interval,
                                                positive=True),
                      repeat_interval=r.duration("repeat_interval", Route.repeat_interval,
                                                 positive=True))

        names = [x.name for x in (*ams, *hooks, *slacks, *mails)]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise NotifyConfigError(
                f"notifications: receiver name {dup!r} is used twice; give each a unique name")
        return cls(alertmanager=tuple(ams), webhooks=tuple(hooks), slack=tuple(slacks),
                   email=tuple(mails), route=route, external_url=external_url)


# ---------------------------------------------------------------------------- dispatching

@dataclass(frozen=True)
class Notification:
    """One message for one receiver: a group's alerts as of a flush (Alertmanager's view)."""

    receiver: str
    group_key: str
    group_labels: dict
    alerts: tuple[AlertMessage, ...]  # firing ones have ends_at None, as Alertmanager sends them
    firing: frozenset  # fingerprints, for the notification log
    resolved: frozenset

    @property
    def status(self) -> str:
        return "firing" if any(a.status == "firing" for a in self.alerts) else "resolved"


def needs_update(entry: Optional[dict], firing: frozenset, resolved: frozenset, *,
                 send_resolved: bool, repeat_interval: float, now: float) -> bool:
    """Alertmanager's DedupStage: notify when something changed or repeat_interval passed."""
    if entry is None:
        return bool(firing)
    if not firing <= set(entry["firing"]):
        return True
    if not firing:
        # Everything resolved: notify (even without send_resolved) to clear the log, unless
        # the alerts fired and resolved between two flushes and nobody heard of them.
        return bool(entry["firing"])
    if send_resolved and not resolved <= set(entry["resolved"]):
        return True
    return entry["at"] <= now - repeat_interval


def group_key(labels: Mapping[str, str], group_by: Sequence[str]) -> tuple[str, dict]:
    """(Alertmanager-style group key, group labels) for an alert's labels."""
    if "..." in group_by:
        chosen = dict(labels)
    else:
        chosen = {k: labels[k] for k in group_by if k in labels}
    body = ", ".join(f"{k}={json.dumps(chosen[k])}" for k in sorted(chosen))
    return "{}:{" + body + "}", chosen


@dataclass
class _Group:
    labels: dict
    alerts: dict  # fingerprint -> AlertMessage (the latest one received)
    next_flush: float
    flushed: bool = False


class Dispatcher:
    """Alertmanager's aggregation groups and notification log, without I/O.

    ``ingest`` adds alerts; ``due(now)`` returns the notifications to send for every group
    whose timer expired; the caller delivers them and reports back with ``delivered`` and
    ``settle``. The notification log (what each receiver was last sent, per group) is what
    ``state_dict`` keeps, so a restarted aggregator does not repeat a firing notification.
    """

    def __init__(self, route: Route, send_resolved: Mapping[str, bool], *,
                 retention: float = 5 * 86400):
        self.route = route
        self.send_resolved = dict(send_resolved)  # receiver name -> send_resolved
        # An entry older than this belongs to a group that vanished unresolved; Alertmanager
        # keeps its log 120h by default.
        self.retention = max(retention, 2 * route.repeat_interval)
        self.groups: dict[str, _Group] = {}
        self.log: dict[str, dict[str, dict]] = {name: {} for name in self.send_resolved}

    def ingest(self, items: Iterable[tuple[float, AlertMessage]]) -> None:
        wait = self.route.group_wait
        for received, msg in items:
            key, labels = group_key(msg.labels, self.route.group_by)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group(labels, {}, received + wait)
            group.alerts[msg.fingerprint] = msg
            # As Alertmanager: an alert that began over group_wait ago is not held back.
            if not group.flushed and msg.starts_at + wait < received:
                group.next_flush = min(group.next_flush, received)

    def next_due(self) -> Optional[float]:
        return min((g.next_flush for g in self.groups.values()), default=None)

    def due(self, now: float) -> list[tuple[str, list[Notification]]]:
        out = []
        for key, group in self.groups.items():
            if group.next_flush > now:
                continue
            group.flushed = True
            group.next_flush = now + self.route.group_interval
            out.append((key, self._notifications(key, group, now)))
        self._prune(now)
        return out

    def _notifications(self, key: str, group: _Group, now: float) -> list[Notification]:
        alerts = []
        for fp in sorted(group.alerts, key=lambda f: sorted(group.alerts[f].labels.items())):
            msg = group.alerts[fp]
            if msg.status == "resolved" or (msg.ends_at is not None and msg.ends_at <= now):
                ends = msg.ends_at if msg.ends_at is not None else now
                alerts.append(dataclasses.replace(msg, status="resolved", ends_at=ends))
            else:  # Alertmanager zeroes endsAt of firing alerts when it flushes
                alerts.append(dataclasses.replace(msg, status="firing", ends_at=None))
        firing = frozenset(a.fingerprint for a in alerts if a.status == "firing")
        resolved = frozenset(a.fingerprint for a in alerts if a.status == "resolved")
        out = []
        for name, send_resolved in self.send_resolved.items():
            if not needs_update(self.log[name].get(key), firing, resolved,
                                send_resolved=send_resolved,
                                repeat_interval=self.route.repeat_interval, now=now):
                continue
            chosen = tuple(a for a in alerts if send_resolved or a.status == "firing")
            n = Notification(name, key, dict(group.labels), chosen, firing, resolved)
            if chosen:
                out.append(n)
            else:  # nothing this receiver wants to see, but the log must forget the firing set
                self.delivered(n, now)
        return out

    def delivered(self, n: Notification, now: float) -> None:
        """Record a notification the receiver accepted."""
        if n.firing:
            self.log[n.receiver][n.group_key] = {
                "firing": sorted(n.firing), "resolved": sorted(n.resolved), "at": now}
        else:
            self.log[n.receiver].pop(n.group_key, None)

    def settle(self, key: str, ok: bool, now: float) -> None:
        """After a flush: forget resolved alerts once every receiver has been told."""
        group = self.groups.get(key)
        if group is None:
            return
        for fp, msg in list(group.alerts.items()):
            ended = msg.ends_at if msg.ends_at is not None else now
            resolved = msg.status == "resolved" or ended <= now
            # A receiver that keeps failing must not keep resolved alerts forever.
            if resolved and (ok or ended <= now - self.route.repeat_interval):
                del group.alerts[fp]
        if not group.alerts:
            del self.groups[key]

    def _prune(self, now: float) -> None:
        for entries in self.log.values():
            for key in [k for k, e in entries.items() if e["at"] < now - self.retention]:
                del entries[key]

    def state_dict(self) -> dict:
        return {"version": 1, "log": json.loads(json.dumps(self.log))}

    def restore(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("restore: not a notifier state_dict (expected version 1)")
        for name, entries in state.get("log", {}).items():
            if name in self.log:  # receivers removed from the config are forgotten
                self.log[name] = {k: {"firing": list(e["firing"]), "resolved": list(e["resolved"]),
                                      "at": float(e["at"])} for k, e in entries.items()}


# ---------------------------------------------------------------------------- payloads

def alertmanager_payload(items: Iterable[tuple[float, AlertMessage]]) -> list[dict]:
    """The JSON array for ``POST /api/v2/alerts`` from (received, message) pairs.

    Keeps the latest message per alert; a resolved one without ``ends_at`` ends when received.
    """
    latest = {m.fingerprint: (t, m) for t, m in items}
    out = []
    for received, m in latest.values():
        alert = m.to_alertmanager()
        if m.status == "resolved" and m.ends_at is None:
            alert["endsAt"] = rfc3339(received)
        out.append(alert)
    return out


def _common(maps: Sequence[Mapping[str, str]]) -> dict:
    if not maps:
        return {}
    return {k: v for k, v in maps[0].items() if all(m.get(k) == v for m in maps[1:])}


def webhook_payload(n: Notification, *, external_url: str = "", max_alerts: int = 0) -> dict:
    """Alertmanager's webhook message, payload version "4"."""
    alerts = list(n.alerts)
    shown = alerts[:max_alerts] if max_alerts else alerts
    return {
        "receiver": n.receiver,
        "status": n.status,
        "alerts": [{
            "status": a.status, "labels": dict(a.labels), "annotations": dict(a.annotations),
            "startsAt": rfc3339(a.starts_at), "endsAt": rfc3339(a.ends_at),
            "generatorURL": a.generator_url, "fingerprint": a.fingerprint} for a in shown],
        "groupLabels": dict(n.group_labels),
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": len(alerts) - len(shown),
    }


def _title(n: Notification) -> str:
    count = sum(a.status == "firing" for a in n.alerts)
    head = f"[FIRING:{count}]" if n.status == "firing" else "[RESOLVED]"
    name = _common([a.labels for a in n.alerts]).get("alertname", "")
    rest = " ".join(f"{k}={v}" for k, v in sorted(n.group_labels.items()) if k != "alertname")
    return " ".join(p for p in (head, name, f"({rest})" if rest else "") if p)


def _describe(a: AlertMessage) -> str:
    text = a.annotations.get("summary") or a.annotations.get("description") or a.name
    labels = ", ".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
    when = rfc3339(a.starts_at) + (f" to {rfc3339(a.ends_at)}" if a.status == "resolved" else "")
    return f"[{a.status}] {text}\n  labels: {labels}\n  since: {when}"


def slack_payload(n: Notification, *, channel: str = "", username: str = "ray-monitor",
                  external_url: str = "") -> dict:
    """A Slack incoming-webhook message: danger/warning while firing, good when resolved."""
    if n.status == "resolved":
        color = "good"
    else:
        severities = {a.labels.get("severity") for a in n.alerts if a.status == "firing"}
        color = "danger" if severities - {"warning", "info"} else "warning"
    title = _title(n)
    attachment = {"color": color, "title": title, "fallback": title,
                  "text": "\n".join(_describe(a) for a in n.alerts), "mrkdwn_in": ["text"]}
    if external_url:
        attachment["title_link"] = external_url
    out = {"username": username, "text": title, "attachments": [attachment]}
    if channel:
        out["channel"] = channel
    return out


def email_message(n: Notification, *, from_addr: str, to: Sequence[str],
                  external_url: str = "") -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = _title(n)
    msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="ray-monitor")
    body = "\n\n".join(_describe(a) for a in n.alerts)
    msg.set_content(body + (f"\n\n{external_url}\n" if external_url else "\n"))
    return msg


# ---------------------------------------------------------------------------- delivery

def urllib_send(method: str, url: str, headers: Mapping[str, str], body: bytes,
                timeout: float) -> int:
    """The default transport: the HTTP status, or OSError for network faults."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code
    except urllib.error.URLError as e:
        # Surface the real cause (ConnectionRefusedError, timeout...) for stats and logs.
        if isinstance(e.reason, OSError):
            raise e.reason from e
        raise


def classify(status: Optional[int], error: Optional[BaseException]) -> tuple[str, str]:
    """("ok" | "retry" | "fail", cause) for one delivery attempt."""
    if error is None:
        if 200 <= status < 300:
            return "ok", ""
        return ("retry" if status == 429 or status >= 500 else "fail"), f"http_{status}"
    if isinstance(error, smtplib.SMTPResponseException):
        return ("retry" if 400 <= error.smtp_code < 500 else "fail"), f"smtp_{error.smtp_code}"
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return "fail", "smtp_recipients_refused"
    if isinstance(error, smtplib.SMTPException) and not isinstance(
            error, smtplib.SMTPServerDisconnected):  # e.g. STARTTLS not offered: will not heal
        return "fail", f"smtp:{type(error).__name__}"
    if isinstance(error, OSError):  # includes timeouts and SMTPServerDisconnected
        return "retry", f"network:{type(error).__name__}"
    return "fail", f"error:{type(error).__name__}"


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with a cap; ``jitter`` in [0, 1) spreads it over [d/2, d)."""
    return min(cap, base * 2 ** attempt) * (0.5 + 0.5 * jitter)


def _smtp_send(factory: Callable[..., Any], r: EmailReceiver, msg: EmailMessage) -> int:
    smtp = factory(r.host, r.port, timeout=r.timeout)
    try:
        if r.starttls:
            smtp.starttls()
        if r.username:
            smtp.login(r.username, r.password)
        smtp.send_message(msg)
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()
    return 250


_KINDS = ("alertmanager", "webhook", "slack", "email")


class Notifier:
    """Queues alert batches and delivers them from one background thread.

    ``submit`` never blocks: the queue is bounded and drops its oldest alert when full.
    Deliveries retry 5xx, 429 and network errors with capped, jittered exponential backoff;
    other 4xx fail at once. Each failure cause is logged once per receiver until it recovers.
    """

    def __init__(self, config: NotifyConfig | Mapping | None = None, *,
                 send: Optional[Send] = None, smtp_factory: Optional[Callable[..., Any]] = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Optional[Callable[[float], Any]] = None, queue_size: int = 10000,
                 max_attempts: int = 5, backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 rng: Optional[random.Random] = None,
                 env: Optional[Mapping[str, str]] = None):
        if not isinstance(config, NotifyConfig):
            config = NotifyConfig.from_dict(config, env=env)
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size: {queue_size!r} must be a whole number >= 1")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts: {max_attempts!r} must be a whole number >= 1")
        if not 0 < backoff_base <= backoff_cap:
            raise ValueError("backoff_base/backoff_cap: need 0 < backoff_base <= backoff_cap")
        self.config = config
        self._send = send or urllib_send
        self._smtp_factory = smtp_factory or smtplib.SMTP
        self._clock = clock
        self._closing = threading.Event()
        self._sleep = sleep or self._closing.wait  # close() cuts a backoff short
        self._queue_size = queue_size
        self._max_attempts = max_attempts
        self._backoff = (backoff_base, backoff_cap)
        self._rng = rng or random.Random()

        self._dispatched = [*config.webhooks, *config.slack, *config.email]
        self._dispatcher = Dispatcher(config.route,
                                      {r.name: r.send_resolved for r in self._dispatched})
        self._lock = threading.Lock()  # queue and counters; never held while sending
        self._cv = threading.Condition(self._lock)
        self._queue: collections.deque = collections.deque()
        self._work_lock = threading.Lock()  # one delivery pass at a time
        self._next_due: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self._logged: set[tuple[str, str]] = set()
        self._stats = {"sent": 0, "failed": 0, "retried": 0, "dropped": 0}
        self._by_kind = {k: {"sent": 0, "failed": 0, "retried": 0} for k in _KINDS}
        self._by_cause: collections.Counter = collections.Counter()
        self._log_state = self._dispatcher.state_dict()

    @property
    def enabled(self) -> bool:
        return bool(self.config.alertmanager or self._dispatched)

    # -- the evaluation loop's side

    def submit(self, messages: Iterable[AlertMessage], now: Optional[float] = None) -> None:
        """Enqueue alerts for delivery and return at once."""
        if not self.enabled:
            return
        received = self._clock() if now is None else now
        dropped = 0
        with self._cv:
            for msg in messages:
                if len(self._queue) >= self._queue_size:
                    self._queue.popleft()
                    dropped += 1
                self._queue.append((received, msg))
            self._stats["dropped"] += dropped
            self._cv.notify()
        if dropped:
            self._log_once("queue", "dropped", logging.WARNING,
                           "notify queue full (%d alerts); dropping the oldest", self._queue_size)

    # -- lifecycle

    def start(self) -> "Notifier":
        if self._thread is None or not self._thread.is_alive():
            self._closing.clear()
            self._thread = threading.Thread(target=self._loop, name="ray-monitor-notify",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> bool:
        """Deliver what is queued (no further retries), stop the thread; True if it stopped."""
        self._closing.set()
        with self._cv:
            self._cv.notify()
        if self._thread is None:
            return self.flush(timeout)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver everything queued and every group that is due, in the caller's thread.

        Returns False when a delivery in progress elsewhere did not finish within timeout.
        """
        if not self._work_lock.acquire(timeout=timeout):
            return False
        try:
            self._work()
        finally:
            self._work_lock.release()
        with self._lock:
            return not self._queue

    def _loop(self) -> None:
        while True:
            closing = self._closing.is_set()  # read first: one more pass after close()
            with self._cv:
                if not self._queue and not closing:
                    self._cv.wait(self._wait_time())
            with self._work_lock:
                self._work()
            if closing:
                return

    def _wait_time(self) -> float:
        due = self._next_due
        # Bounded so that an injected clock that jumps is noticed within a second.
        return 1.0 if due is None else min(1.0, max(0.01, due - self._clock()))

    def _work(self) -> None:
        try:
            with self._lock:
                batch = list(self._queue)
                self._queue.clear()
            if batch and self.config.alertmanager:
                body = json.dumps(alertmanager_payload(batch)).encode()
                for r in self.config.alertmanager:
                    self._deliver("alertmanager", r.name, lambda r=r: self._send(
                        "POST", r.url + "/api/v2/alerts",
                        {"Content-Type": "application/json"}, body, r.timeout))
            if not self._dispatched:
                return
            self._dispatcher.ingest(batch)
            for key, notifications in self._dispatcher.due(self._clock()):
                ok = True
                for n in notifications:
                    if self._notify(n):
                        self._dispatcher.delivered(n, self._clock())
                        self._publish_log()
                    else:
                        ok = False
                self._dispatcher.settle(key, ok, self._clock())
            self._next_due = self._dispatcher.next_due()
            self._publish_log()
        except Exception:  # the sender thread must outlive any bug in a payload or receiver
            self._log_once("notifier", "internal", logging.ERROR,
                           "notify: unexpected error in the sender", exc_info=True)

    def _notify(self, n: Notification) -> bool:
        r = next(x for x in self._dispatched if x.name == n.receiver)
        ext = self.config.external_url
        if isinstance(r, WebhookReceiver):
            body = json.dumps(webhook_payload(n, external_url=ext,
                                              max_alerts=r.max_alerts)).encode()
            headers = {"Content-Type": "application/json", **dict(r.headers)}
            return self._deliver("webhook", r.name,
                                 lambda: self._send("POST", r.url, headers, body, r.timeout))
        if isinstance(r, SlackReceiver):
            body = json.dumps(slack_payload(n, channel=r.channel, username=r.username,
                                            external_url=ext)).encode()
            return self._deliver("slack", r.name, lambda: self._send(
                "POST", r.webhook_url, {"Content-Type": "application/json"}, body, r.timeout))
        msg = email_message(n, from_addr=r.from_addr, to=r.to, external_url=ext)
        return self._deliver("email", r.name, lambda: _smtp_send(self._smtp_factory, r, msg))

    def _deliver(self, kind: str, name: str, attempt: Callable[[], int]) -> bool:
        base, cap = self._backoff
        for i in range(self._max_attempts):
            try:
                status, error = attempt(), None
            except Exception as e:  # a transport may raise anything; classify decides
                status, error = None, e
            outcome, cause = classify(status, error)
            if outcome == "ok":
                self._count(kind, "sent")
                self._recovered(name)
                return True
            with self._lock:
                self._by_cause[cause] += 1
            last = outcome == "fail" or i + 1 == self._max_attempts or self._closing.is_set()
            if last:
                self._count(kind, "failed")
                self._log_once(name, cause, logging.WARNING,
                               "notify: %s receiver %r failed (%s) after %d attempt(s); "
                               "giving up on this notification", kind, name, cause, i + 1)
                return False
            self._count(kind, "retried")
            self._log_once(name, cause, logging.WARNING,
                           "notify: %s receiver %r failed (%s); retrying with backoff",
                           kind, name, cause)
            self._sleep(backoff_delay(i, base=base, cap=cap, jitter=self._rng.random()))
        return False

    # -- bookkeeping

    def _count(self, kind: str, what: str) -> None:
        with self._lock:
            self._stats[what] += 1
            self._by_kind[kind][what] += 1

    def _log_once(self, who: str, cause: str, level: int, fmt: str, *args: Any,
                  exc_info: bool = False) -> None:
        with self._lock:
            if (who, cause) in self._logged:
                return
            self._logged.add((who, cause))
        logger.log(level, fmt + " (logged once per cause)", *args, exc_info=exc_info)

    def _recovered(self, name: str) -> None:
        with self._lock:
            causes = {c for w, c in self._logged if w == name}
            self._logged -= {(name, c) for c in causes}
        if causes:
            logger.info("notify: receiver %r delivers again (after %s)", name,
                        ", ".join(sorted(causes)))

    def stats(self) -> dict:
        """Counters for the monitor's self-metrics."""
        with self._lock:
            return {**self._stats, "queued": len(self._queue),
                    "by_kind": {k: dict(v) for k, v in self._by_kind.items()},
                    "by_cause": dict(self._by_cause)}

    # -- restart safety

    def _publish_log(self) -> None:
        state = self._dispatcher.state_dict()
        with self._lock:
            self._log_state = state

    def state_dict(self) -> dict:
        """JSON-serialisable notification log; hand it to ``restore`` after a restart.

        A copy taken after every delivery, so it never waits for a receiver that hangs.
        """
        with self._lock:
            return json.loads(json.dumps(self._log_state))

    def restore(self, state: Mapping) -> None:
        """Load a ``state_dict``; call it before ``start()``."""
        with self._work_lock:
            self._dispatcher.restore(state)
            self._publish_log()
