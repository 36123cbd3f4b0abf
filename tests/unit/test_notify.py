"""Alert notifications: config, payloads, Alertmanager-style dispatching, delivery."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from ray_monitor.alerting.message import AlertMessage, fingerprint
from ray_monitor.alerting.dispatch import Notification
from ray_monitor.alerting.notifier import Notifier
from ray_monitor.alerting.notify_config import NotifyConfig
from ray_monitor.alerting.notify_config import parse_seconds_field as parse_duration
from ray_monitor.alerting.payloads import slack_payload, webhook_payload
from ray_monitor.common.errors import ConfigError
from tests.helpers import Clock

T0 = 1_700_000_000.0


class Transport:
    """Records requests; answers with the queued statuses (or raises queued errors), then 200."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[dict] = []

    def __call__(self, method, url, headers, body, timeout):
        self.calls.append({"method": method, "url": url, "headers": dict(headers),
                           "json": json.loads(body), "timeout": timeout})
        answer = self.answers.pop(0) if self.answers else 200
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def to(self, url_part: str) -> list[dict]:
        return [c["json"] for c in self.calls if url_part in c["url"]]


def alert(name="HighLatencyP99", deployment="classifier", status="firing", starts=T0,
          ends=None, **labels) -> AlertMessage:
    labels = {"alertname": name, "deployment": deployment, "severity": "page", **labels}
    if ends is None and status == "firing":
        ends = starts + 3600  # still firing: ends_at in the future, as the rule engine sends
    return AlertMessage(labels=labels, annotations={"summary": f"{name} on {deployment}"},
                        starts_at=starts, ends_at=ends, status=status,
                        generator_url="http://monitor/rules")


ROUTE = {"group_by": ["alertname", "deployment"], "group_wait": "10s",
         "group_interval": "30s", "repeat_interval": "5m"}
HOOK = "http://hooks.test/alerts"


def notifier(clock, transport, route=ROUTE, **receivers) -> Notifier:
    config = {"route": route, **receivers}
    if not receivers:
        config["webhooks"] = [{"url": HOOK}]
    return Notifier(config, send=transport, clock=clock, sleep=clock.sleep, env={})


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("config, field", [
    ({"webhook": [{"url": HOOK}]}, "notifications.webhook"),
    ({"alertmanager": {"url": "http://am:9093"}}, "notifications.alertmanager"),
    ({"alertmanager": [{"timeout": "5s"}]}, "notifications.alertmanager[0].url"),
    ({"alertmanager": [{"url": "am:9093"}]}, "notifications.alertmanager[0].url"),
    ({"alertmanager": [{"url": "http://am:9093", "timeout": "5 sec"}]},
     "notifications.alertmanager[0].timeout"),
    ({"webhooks": [{"url": HOOK, "send_resolve": True}]}, "notifications.webhooks[0].send_resolve"),
    ({"webhooks": [{"url": HOOK, "send_resolved": "yes"}]},
     "notifications.webhooks[0].send_resolved"),
    ({"webhooks": [{"url": HOOK, "max_alerts": -1}]}, "notifications.webhooks[0].max_alerts"),
    ({"webhooks": [{"url": HOOK, "headers": {"X-Token": 3}}]}, "notifications.webhooks[0].headers"),
    ({"slack": [{"channel": "#alerts"}]}, "notifications.slack[0].webhook_url"),
    ({"email": [{"smarthost": "localhost", "from": "a@x", "to": ["b@x"]}]},
     "notifications.email[0].smarthost"),
    ({"email": [{"smarthost": "localhost:25", "from": "a@x", "to": []}]},
     "notifications.email[0].to"),
    ({"email": [{"smarthost": "localhost:25", "to": ["b@x"]}]}, "notifications.email[0].from"),
    ({"route": {"group_by": "alertname"}}, "notifications.route.group_by"),
    ({"route": {"repeat_interval": "soon"}}, "notifications.route.repeat_interval"),
    ({"route": {"group_interval": 0}}, "notifications.route.group_interval"),
    ({"webhooks": [{"url": HOOK, "name": "ops"}], "slack": [{"webhook_url": HOOK, "name": "ops"}]},
     "receiver name 'ops'"),
    ("webhooks", "notifications: expected a mapping"),
])
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ConfigError) as info:
        NotifyConfig.from_dict(config, env={})
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_full_config_parses():
    config = NotifyConfig.from_dict({
        "alertmanager": [{"url": "http://127.0.0.1:9093/", "timeout": "5s"}],
        "webhooks": [{"url": HOOK, "send_resolved": False, "max_alerts": 5,
                      "headers": {"Authorization": "Bearer t"}}],
        "slack": [{"webhook_url": "https://hooks.slack.com/x", "channel": "#alerts"}],
        "email": [{"smarthost": "127.0.0.1:25", "from": "mon@x.org", "to": "a@x.org, b@x.org",
                   "starttls": False}],
        "route": {"group_by": ["alertname", "deployment"], "group_wait": "0s",
                  "group_interval": "10s", "repeat_interval": "1h"},
    }, env={})
    assert config.alertmanager[0].url == "http://127.0.0.1:9093"
    assert config.alertmanager[0].timeout == 5.0
    assert config.webhooks[0].send_resolved is False and config.webhooks[0].max_alerts == 5
    assert config.slack[0].channel == "#alerts"
    assert (config.email[0].host, config.email[0].port) == ("127.0.0.1", 25)
    assert config.email[0].to == ("a@x.org", "b@x.org")
    assert (config.route.group_wait, config.route.group_interval,
            config.route.repeat_interval) == (0, 10, 3600)
    assert [r.name for r in (*config.webhooks, *config.slack)] == ["webhook-0", "slack-0"]


def test_durations():
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration(7) == 7.0
    with pytest.raises(ConfigError, match="Prometheus duration"):
        parse_duration("-5s")


def test_urls_from_environment_when_config_is_silent(caplog):
    env = {"RAY_MONITOR_ALERTMANAGER_URL": "http://am:9093",
           "RAY_MONITOR_WEBHOOK_URL": "http://hook/x",
           "RAY_MONITOR_SLACK_WEBHOOK_URL": "not a url"}
    with caplog.at_level(logging.WARNING, logger="ray_monitor.env"):
        config = NotifyConfig.from_dict({}, env=env)
    assert [r.url for r in config.alertmanager] == ["http://am:9093"]
    assert [r.url for r in config.webhooks] == ["http://hook/x"]
    assert config.slack == ()  # a bad environment value is logged, not raised
    assert "RAY_MONITOR_SLACK_WEBHOOK_URL" in caplog.text
    # The config, when it says something (even "none"), wins over the environment.
    config = NotifyConfig.from_dict({"webhooks": [], "alertmanager": [{"url": "http://b:1"}]},
                                    env=env)
    assert config.webhooks == () and config.alertmanager[0].url == "http://b:1"


# ---------------------------------------------------------------------------- payloads

WEBHOOK_KEYS = {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels",
                "commonLabels", "commonAnnotations", "externalURL", "alerts"}
ALERT_KEYS = {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL",
              "fingerprint"}


def test_webhook_payload_is_version_4():
    clock, t = Clock(T0), Transport()
    n = Notifier({"route": ROUTE, "external_url": "http://monitor:8080",
                  "webhooks": [{"url": HOOK, "name": "ops", "max_alerts": 1}]},
                 send=t, clock=clock, sleep=clock.sleep, env={})
    firing = alert(zone="a")
    resolved = alert(zone="b", status="resolved", starts=T0 - 60, ends=T0)
    n.submit([firing, resolved])
    clock.t += 10
    n.flush()
    [body] = t.to(HOOK)
    assert set(body) == WEBHOOK_KEYS
    assert body["version"] == "4" and body["receiver"] == "ops"
    assert body["status"] == "firing"
    assert body["groupKey"] == '{}:{alertname="HighLatencyP99", deployment="classifier"}'
    assert body["groupLabels"] == {"alertname": "HighLatencyP99", "deployment": "classifier"}
    assert body["commonLabels"] == {"alertname": "HighLatencyP99", "deployment": "classifier",
                                    "severity": "page"}
    assert body["commonAnnotations"] == {"summary": "HighLatencyP99 on classifier"}
    assert body["externalURL"] == "http://monitor:8080"
    assert body["truncatedAlerts"] == 1 and len(body["alerts"]) == 1
    [a] = body["alerts"]
    assert set(a) == ALERT_KEYS
    assert a["fingerprint"] == firing.fingerprint == fingerprint(firing.labels)
    assert len(a["fingerprint"]) == 16
    assert a["startsAt"] == "2023-11-14T22:13:20Z"
    assert a["endsAt"] == "0001-01-01T00:00:00Z"  # firing: zero time, as Alertmanager sends
    assert a["generatorURL"] == "http://monitor/rules"


def test_resolved_alert_carries_its_end_time():
    n = Notification("ops", "{}:{}", {}, (alert(status="resolved", starts=T0, ends=T0 + 90),),
                     frozenset(), frozenset({"x"}))
    body = webhook_payload(n)
    assert body["status"] == "resolved"
    assert body["alerts"][0]["endsAt"] == "2023-11-14T22:14:50Z"


def test_fingerprint_matches_alertmanager_for_empty_labels():
    assert fingerprint({}) == "cbf29ce484222325"  # FNV-1a 64 offset basis, as in Go


def test_slack_payload_colors_by_status():
    firing = Notification("s", "k", {"alertname": "X"}, (alert("X"),), frozenset({"f"}),
                          frozenset())
    resolved = Notification("s", "k", {"alertname": "X"},
                            (alert("X", status="resolved", ends=T0 + 5),), frozenset(),
                            frozenset({"f"}))
    warn = Notification("s", "k", {"alertname": "X"}, (alert("X", severity="warning"),),
                        frozenset({"f"}), frozenset())
    body = slack_payload(firing, channel="#alerts")
    assert body["channel"] == "#alerts"
    assert body["text"].startswith("[FIRING:1] X")
    assert body["attachments"][0]["color"] == "danger"
    assert "X on classifier" in body["attachments"][0]["text"]
    assert slack_payload(resolved)["attachments"][0]["color"] == "good"
    assert slack_payload(resolved)["text"].startswith("[RESOLVED] X")
    assert slack_payload(warn)["attachments"][0]["color"] == "warning"


# ---------------------------------------------------------------------------- alertmanager

def test_alertmanager_gets_every_batch_as_it_comes():
    clock, t = Clock(T0), Transport()
    n = notifier(clock, t, alertmanager=[{"url": "http://am:9093"}])
    a = alert()
    n.submit([a])
    n.flush()
    n.submit([a])  # a re-send: Alertmanager dedups it, so we do not
    n.flush()
    posts = [c for c in t.calls if c["url"] == "http://am:9093/api/v2/alerts"]
    assert len(posts) == 2
    assert posts[0]["json"] == [a.to_alertmanager()]
    assert posts[0]["headers"]["Content-Type"] == "application/json"


# ---------------------------------------------------------------------------- dispatching

def test_grouping_and_group_wait():
    clock, t = Clock(T0), Transport()
    n = notifier(clock, t)
    n.submit([alert(deployment="a", zone="1"), alert(deployment="a", zone="2"),
              alert(deployment="b")])
    clock.t += 9
    n.flush()
    assert t.calls == []  # group_wait not over
    clock.t += 1
    n.flush()
    bodies = sorted(t.to(HOOK), key=lambda b: b["groupLabels"]["deployment"])
    assert [b["groupLabels"]["deployment"] for b in bodies] == ["a", "b"]
    assert [len(b["alerts"]) for b in bodies] == [2, 1]


def test_changes_wait_for_group_interval_and_repeats_wait_for_repeat_interval():
    clock, t = Clock(T0), Transport()
    n = notifier(clock, t)
    n.submit([alert(zone="1")])
    clock.t += 10
    n.flush()
    assert len(t.calls) == 1
    clock.t += 5
    n.submit([alert(zone="1"), alert(zone="2", starts=clock.t)])  # a new alert joins
    n.flush()
    assert len(t.calls) == 1  # group_interval (30s) not over
    clock.t += 25
    n.flush()
    assert len(t.calls) == 2 and len(t.to(HOOK)[1]["alerts"]) == 2
    for _ in range(9):  # unchanged and still firing: nothing until repeat_interval (5m)
        clock.t += 30
        n.submit([alert(zone="1"), alert(zone="2", starts=T0 + 15)])
        n.flush()
    assert len(t.calls) == 2
    clock.t += 30  # 300 s since the last notification, at T0 + 40
    n.flush()
    assert len(t.calls) == 3 and t.to(HOOK)[2]["status"] == "firing"


def test_send_resolved_and_a_new_firing_after_resolution():
    clock, t = Clock(T0), Transport()
    n = notifier(clock, t, webhooks=[{"url": HOOK}, {"url": "http://quiet/x",
                                                     "send_resolved": False}])
    n.submit([alert()])
    clock.t += 10
    n.flush()
    assert len(t.to(HOOK)) == 1 and len(t.to("quiet")) == 1
    clock.t += 30
    n.submit([alert(status="resolved", ends=clock.t)])
    n.flush()
    assert t.to(HOOK)[1]["status"] == "resolved"
    assert t.to(HOOK)[1]["alerts"][0]["status"] == "resolved"
    assert len(t.to("quiet")) == 1  # send_resolved: false
    clock.t += 600
    n.flush()
    assert len(t.calls) == 3  # nothing left to say
    n.submit([alert(starts=clock.t)])  # fires again: a new group, a new notification
    clock.t += 10
    n.flush()
    assert len(t.to(HOOK)) == 3 and t.to(HOOK)[2]["status"] == "firing"
    assert len(t.to("quiet")) == 2


def test_alert_not_renewed_resolves_at_its_ends_at():
    clock, t = Clock(T0), Transport()
    n = notifier(clock, t)
    n.submit([alert(ends=T0 + 40)])
    clock.t += 10
    n.flush()
    clock.t += 30
    n.flush()
    assert [b["status"] for b in t.to(HOOK)] == ["firing", "resolved"]


def test_old_alert_in_a_new_group_skips_group_wait():
    clock, t = Clock(T0 + 600), Transport()
    n = notifier(clock, t)
    n.submit([alert(starts=T0)])
    n.flush()
    assert len(t.calls) == 1


def test_restore_prevents_a_duplicate_firing_after_restart():
    clock, t = Clock(T0), Transport()
    first = notifier(clock, t)
    first.submit([alert()])
    clock.t += 10
    first.flush()
    assert len(t.calls) == 1
    state = json.loads(json.dumps(first.state_dict()))  # it goes through GCS as JSON

    clock.t += 20  # the aggregator restarts and re-sends the still-firing alert
    fresh = notifier(clock, Transport())
    fresh.submit([alert()])
    fresh.flush()
    assert len(fresh._send.calls) == 1  # without the log: a duplicate

    second = notifier(clock, t)
    second.restore(state)
    second.submit([alert()])
    second.flush()
    assert len(t.calls) == 1  # with the log: none
    clock.t = T0 + 10 + 300  # repeat_interval after the first notification
    second.submit([alert()])
    second.flush()
    assert len(t.calls) == 2
    second.submit([alert(status="resolved", ends=clock.t)])
    clock.t += 30
    second.flush()
    assert t.to(HOOK)[-1]["status"] == "resolved"
    assert second.state_dict()["log"] == {"webhook-0": {}}


class Store:
    """The GCS as the notifier sees it: what persist_log last wrote, through JSON."""

    def __init__(self):
        self.saved = None
        self.writes = 0

    def __call__(self, log):
        self.saved = json.loads(json.dumps(log))
        self.writes += 1


def test_the_log_is_saved_before_the_receiver_hears_of_it():
    """A kill at the worst moment, right after the POST: what the store holds then already
    says 'sent', so the restarted notifier sends no second firing notification."""
    clock, store = Clock(T0), Store()
    at_post = []

    def send(method, url, headers, body, timeout):
        at_post.append(json.loads(json.dumps(store.saved)))  # the store, as the POST goes out
        return 200

    first = Notifier({"route": ROUTE, "webhooks": [{"url": HOOK}]}, send=send, clock=clock,
                     sleep=clock.sleep, env={}, persist_log=store)
    first.submit([alert()])
    clock.t += 10
    first.flush()
    [snapshot] = at_post
    [entry] = snapshot["log"]["webhook-0"].values()
    assert entry["unconfirmed"] is True and entry["firing"]
    assert "unconfirmed" not in next(iter(store.saved["log"]["webhook-0"].values()))

    clock.t += 20  # killed right after the POST: restart from the store as it was then
    t = Transport()
    second = notifier(clock, t)
    second.restore(snapshot, restarted=True)
    second.submit([alert()])
    second.flush()
    assert t.calls == []  # no second page
    assert second.stats()["by_cause"]["unconfirmed_at_restart"] == 1
    clock.t = T0 + 10 + 300  # and the alert is repeated at repeat_interval, as always
    second.submit([alert()])
    second.flush()
    assert len(t.calls) == 1


def test_a_refused_notification_is_taken_back_from_the_saved_log():
    clock, store = Clock(T0), Store()
    t = Transport(400)  # not retried
    n = Notifier({"route": ROUTE, "webhooks": [{"url": HOOK}]}, send=t, clock=clock,
                 sleep=clock.sleep, env={}, persist_log=store)
    n.submit([alert()])
    clock.t += 10
    n.flush()
    assert len(t.calls) == 1 and store.saved["log"] == {"webhook-0": {}}
    clock.t += 30  # group_interval: the receiver never took it, so it is sent again
    n.submit([alert()])
    n.flush()
    assert len(t.calls) == 2 and store.saved["log"]["webhook-0"]


def test_a_failed_save_is_counted_and_the_page_still_goes():
    clock, t = Clock(T0), Transport()

    def broken(log):
        raise ConnectionError("GCS unreachable")

    n = Notifier({"route": ROUTE, "webhooks": [{"url": HOOK}]}, send=t, clock=clock,
                 sleep=clock.sleep, env={}, persist_log=broken)
    n.submit([alert()])
    clock.t += 10
    n.flush()
    assert len(t.calls) == 1
    assert n.stats()["by_cause"]["log_save_failed"] >= 1


# ---------------------------------------------------------------------------- delivery

@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_5xx_and_429_with_capped_backoff(status):
    clock, t = Clock(T0), Transport(status, status, status, status)
    n = Notifier({"route": ROUTE, "webhooks": [{"url": HOOK}]}, send=t, clock=clock,
                 sleep=clock.sleep, env={}, max_attempts=6, backoff_base=1, backoff_cap=4)
    n.submit([alert()])
    clock.t += 10
    n.flush()
    assert len(t.calls) == 5  # four failures, then delivered
    assert len(clock.sleeps) == 4
    for i, delay in enumerate(clock.sleeps):  # jittered within [d/2, d], d = min(4, 2**i)
        assert min(4, 2 ** i) / 2 <= delay <= min(4, 2 ** i)
    stats = n.stats()
    assert stats["sent"] == 1 and stats["retried"] == 4 and stats["failed"] == 0
    assert stats["by_cause"] == {f"http_{status}": 4}
    assert stats["by_kind"]["webhook"] == {"sent": 1, "failed": 0, "retried": 4}


def test_no_retry_on_400_and_logged_once_per_cause(caplog):
    clock, t = Clock(T0), Transport(400, 400)
    n = notifier(clock, t)
    with caplog.at_level(logging.WARNING, logger="ray_monitor.alerting.notifier"):
        n.submit([alert(deployment="a"), alert(deployment="b")])
        clock.t += 10
        n.flush()
    assert len(t.calls) == 2 and clock.sleeps == []
    assert n.stats()["failed"] == 2 and n.stats()["by_cause"] == {"http_400": 2}
    assert len([r for r in caplog.records if "http_400" in r.getMessage()]) == 1
    clock.t += 30  # a failed notification is tried again at the next group_interval
    n.flush()
    assert n.stats()["sent"] == 2


def test_retries_a_refused_connection_over_the_real_transport():
    with socket.socket() as s:  # a loopback port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = Clock(T0)
    n = Notifier({"alertmanager": [{"url": f"http://127.0.0.1:{port}", "timeout": 2}]},
                 clock=clock, sleep=clock.sleep, env={}, max_attempts=3)
    n.submit([alert()])
    n.flush()
    stats = n.stats()
    assert stats["retried"] == 2 and stats["failed"] == 1
    assert stats["by_cause"] == {"network:ConnectionRefusedError": 3}


def test_full_queue_drops_the_oldest():
    clock, t = Clock(T0), Transport()
    n = Notifier({"alertmanager": [{"url": "http://am:9093"}]}, send=t, clock=clock,
                 env={}, queue_size=3)
    alerts = [alert(deployment=f"d{i}") for i in range(5)]
    n.submit(alerts)
    assert n.stats()["dropped"] == 2 and n.stats()["queued"] == 3
    n.flush()
    assert t.calls[0]["json"] == [a.to_alertmanager() for a in alerts[2:]]


def test_submit_never_blocks_on_a_hanging_transport():
    entered, release = threading.Event(), threading.Event()

    def hanging(method, url, headers, body, timeout):
        entered.set()
        release.wait(30)
        return 200

    n = Notifier({"alertmanager": [{"url": "http://am:9093"}]}, send=hanging, env={},
                 queue_size=10).start()
    try:
        n.submit([alert()])
        assert entered.wait(10)  # the sender thread is now stuck inside the transport
        for i in range(50):
            n.submit([alert(deployment=f"d{i}")])
        assert not release.is_set()  # every submit returned while the transport hung
        assert n.stats()["dropped"] == 40
        assert n.flush(timeout=0.05) is False  # flush says it could not finish
        assert isinstance(n.state_dict(), dict)  # and state_dict does not wait either
    finally:
        release.set()
        assert n.close(timeout=10)
    assert n.stats()["queued"] == 0 and n.stats()["sent"] == 2


def test_close_delivers_what_is_queued():
    t = Transport()
    n = Notifier({"alertmanager": [{"url": "http://am:9093"}]}, send=t, env={}).start()
    n.submit([alert()])
    assert n.close(timeout=10)
    assert len(t.calls) == 1


# ---------------------------------------------------------------------------- over the wire

def test_webhook_and_slack_over_real_http(capture_server):
    base = capture_server.url
    n = Notifier({"route": {"group_wait": 0, "group_by": ["alertname"]},
                  "webhooks": [{"url": base + "/hook", "headers": {"X-Token": "s3cret"}}],
                  "slack": [{"webhook_url": base + "/slack", "channel": "#alerts"}]},
                 env={}).start()
    try:
        n.submit([alert(starts=time.time())])  # real time: the sender thread uses it
        got = {}
        for _ in range(2):
            c = capture_server.get(timeout=15)
            got[c.path] = (c.headers, c.body)
    finally:
        n.close(timeout=10)
    headers, hook = got["/hook"]
    assert headers["X-Token"] == "s3cret"
    assert set(hook) == WEBHOOK_KEYS and hook["alerts"][0]["labels"]["alertname"] == "HighLatencyP99"
    _, slack = got["/slack"]
    assert slack["channel"] == "#alerts" and slack["attachments"][0]["color"] == "danger"
    assert n.stats()["by_kind"]["webhook"]["sent"] == 1
    assert n.stats()["by_kind"]["slack"]["sent"] == 1


def test_email_over_real_smtp():
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append(envelope)
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        clock = Clock(T0)
        n = Notifier({"route": {"group_wait": 0},
                      "email": [{"smarthost": f"127.0.0.1:{port}", "from": "monitor@example.org",
                                 "to": ["oncall@example.org"]}]},
                     clock=clock, env={})
        n.submit([alert()])
        n.flush()
    finally:
        controller.stop()
    [envelope] = inbox.messages
    assert envelope.mail_from == "monitor@example.org"
    assert envelope.rcpt_tos == ["oncall@example.org"]
    text = envelope.content.decode()
    assert "Subject: [FIRING:1] HighLatencyP99" in text
    assert "HighLatencyP99 on classifier" in text
    assert n.stats()["by_kind"]["email"]["sent"] == 1


def test_a_restarted_aggregator_takes_its_notification_log_from_the_store():
    """The log's own key (written before each send) wins; a state saved by an older
    version, with the log inside, is read too."""
    from ray_monitor.aggregator.core import AggregatorCore

    key = 'alertname="HighLatencyP99"'
    saved = {"version": 1, "log": {"webhook-0": {key: {"firing": ["f1"], "resolved": [],
                                                         "at": T0, "unconfirmed": True}}}}
    config = {"notifications": {"webhooks": [{"url": HOOK}]}}
    core = AggregatorCore(config, clock=Clock(T0 + 5), load_log=lambda: saved)
    try:
        assert core.notifier.state_dict()["log"]["webhook-0"][key]["firing"] == ["f1"]
        assert core.notifier.stats()["by_cause"]["unconfirmed_at_restart"] == 1
    finally:
        core.notifier.close(1)
    alerts = AggregatorCore({}).engine.state_dict()
    old = json.dumps({"alerts": alerts, "notifier": {**saved, "log": {"webhook-0": {
        key: {"firing": ["f1"], "resolved": [], "at": T0}}}}}).encode()
    core = AggregatorCore(config, clock=Clock(T0 + 5), load=lambda: old)
    try:
        assert core.notifier.state_dict()["log"]["webhook-0"][key]["firing"] == ["f1"]
    finally:
        core.notifier.close(1)
