"""What each receiver is sent: Alertmanager's ``POST /api/v2/alerts`` array, the webhook
payload version "4", a Slack incoming-webhook message, an email.

Runs in the aggregator's notification sender. Pure functions of the alerts: the shapes
are Alertmanager's own, so that tools written for Alertmanager read them unchanged.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Iterable, Mapping, Sequence

from ray_monitor.alerting.dispatch import Notification
from ray_monitor.alerting.message import AlertMessage, rfc3339

__all__ = ["alertmanager_payload", "email_message", "slack_payload", "webhook_payload"]


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
