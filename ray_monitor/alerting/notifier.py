"""Delivery of alert notifications: a bounded queue, one sender thread, retries.

Runs in the aggregator. Its evaluation loop calls :meth:`Notifier.submit` with the rule
engine's ``to_send`` list; ``submit`` only enqueues, and never blocks evaluation. A
background thread delivers: Alertmanager receivers get every batch as it comes
(Alertmanager groups and dedups itself, exactly as with Prometheus); webhook, Slack and
email receivers go through the :class:`~ray_monitor.alerting.dispatch.Dispatcher`, which
groups, waits and dedups the way an Alertmanager route does. It decides what is retried
(5xx, 429, network errors; with capped, jittered exponential backoff) and what fails at
once (other 4xx), and logs each cause once per receiver until it recovers.

Restart safety: a routed notification is written to the notification log, and the log
handed to ``persist_log`` (the aggregator saves it in Ray's GCS), *before* the receiver
is called; the receiver's refusal takes the entry back. So an aggregator killed at any
moment, even right after the POST, sends no second page for the episode. The price, for
a kill in the instant between the save and the receiver's answer: that one notification
may be lost (it is logged and counted at the restart, and sent again at
``repeat_interval``): at most once, never twice.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import smtplib
import threading
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from typing import Any, Callable, Iterable, Mapping, Optional

from ray_monitor.alerting.dispatch import Dispatcher, Notification
from ray_monitor.alerting.message import AlertMessage
from ray_monitor.alerting.notify_config import (EmailReceiver, NotifyConfig, SlackReceiver,
                                                WebhookReceiver)
from ray_monitor.alerting.payloads import (alertmanager_payload, email_message, slack_payload,
                                           webhook_payload)

__all__ = ["Notifier", "Send", "backoff_delay", "classify", "urllib_send"]

logger = logging.getLogger(__name__)

#: The transport: (method, url, headers, body, timeout) -> HTTP status; raises OSError on
#: network faults. Tests pass a plain function.
Send = Callable[[str, str, Mapping[str, str], bytes, float], int]


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
                 env: Optional[Mapping[str, str]] = None,
                 persist_log: Optional[Callable[[dict], None]] = None):
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
        self._persist_log = persist_log
        self._saved_log: Optional[str] = None

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
                    # Write-ahead: recorded as sent, and saved, before the receiver hears it.
                    previous = self._dispatcher.delivered(n, self._clock(), confirmed=False)
                    self._publish_log()
                    if self._notify(n):
                        self._dispatcher.confirm(n)
                    else:
                        self._dispatcher.undo(n, previous)
                        ok = False
                    self._publish_log()
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
        """Makes the log current for ``state_dict`` and saves it through ``persist_log``
        when it changed (a failed save is counted; the notification still goes)."""
        state = self._dispatcher.state_dict()
        with self._lock:
            self._log_state = state
        if self._persist_log is None:
            return
        text = json.dumps(state, sort_keys=True)
        if text == self._saved_log:
            return
        try:
            self._persist_log(state)
            self._saved_log = text
        except Exception as e:
            with self._lock:
                self._by_cause["log_save_failed"] += 1
            self._log_once("notifier", "log_save_failed", logging.WARNING,
                           "notify: the notification log could not be saved (%r); a restart "
                           "now may repeat a notification", e)

    def state_dict(self) -> dict:
        """JSON-serialisable notification log; hand it to ``restore`` after a restart.

        A copy taken after every delivery, so it never waits for a receiver that hangs.
        """
        with self._lock:
            return json.loads(json.dumps(self._log_state))

    def restore(self, state: Mapping, *, restarted: bool = False) -> None:
        """Load a ``state_dict``; call it before ``start()``. ``restarted``: the state is
        that of an aggregator that stopped (was killed): a notification it recorded but
        never saw accepted is taken as sent (at most once), and said so."""
        with self._work_lock:
            self._dispatcher.restore(state)
            unconfirmed = self._dispatcher.unconfirmed()
            for name, key in unconfirmed:
                self._dispatcher.log[name][key].pop("unconfirmed", None)
            if restarted and unconfirmed:
                with self._lock:
                    self._by_cause["unconfirmed_at_restart"] += len(unconfirmed)
                logger.warning("notify: %d notification(s) were being sent when the aggregator "
                               "stopped (%s); they are taken as sent, so none is repeated",
                               len(unconfirmed), ", ".join(f"{n} {k}" for n, k in unconfirmed))
            self._publish_log()
