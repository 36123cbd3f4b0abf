"""Alertmanager's route for webhook, Slack and email receivers: groups, waits and dedup.

Runs in the aggregator, inside the :class:`~ray_monitor.alerting.notifier.Notifier`'s
sender thread, and does no I/O: it decides which alerts go out together, when
(``group_wait``, ``group_interval``, ``repeat_interval``), and whether a receiver has
heard it all already. Its notification log survives a restart through ``state_dict()``
and ``restore()``, so a restarted aggregator does not repeat a firing notification. A
notification is written to the log before it is sent (``unconfirmed`` until the receiver
accepts it, taken back if it refuses), so the log can be saved first.
(Alertmanager receivers get every batch as it comes: Alertmanager does this itself.)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from ray_monitor.alerting.message import AlertMessage
from ray_monitor.alerting.notify_config import Route

__all__ = ["Dispatcher", "Notification", "group_key", "needs_update"]


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

    def delivered(self, n: Notification, now: float, *, confirmed: bool = True) -> Optional[dict]:
        """Record a notification as sent: after the receiver accepted it, or before sending
        (``confirmed=False``; then :meth:`confirm` or :meth:`undo`). Returns the entry it
        replaced, for :meth:`undo`."""
        entries = self.log[n.receiver]
        previous = entries.get(n.group_key)
        if n.firing:
            entry = {"firing": sorted(n.firing), "resolved": sorted(n.resolved), "at": now}
            if not confirmed:
                entry["unconfirmed"] = True
            entries[n.group_key] = entry
        else:
            entries.pop(n.group_key, None)
        return previous

    def confirm(self, n: Notification) -> None:
        """The receiver accepted a notification recorded before sending."""
        entry = self.log[n.receiver].get(n.group_key)
        if entry is not None:
            entry.pop("unconfirmed", None)

    def undo(self, n: Notification, previous: Optional[dict]) -> None:
        """The receiver did not take a notification recorded before sending: the log as
        it was, so it is sent again."""
        if previous is None:
            self.log[n.receiver].pop(n.group_key, None)
        else:
            self.log[n.receiver][n.group_key] = previous

    def unconfirmed(self) -> list[tuple[str, str]]:
        """(receiver, group key) of notifications recorded but not known to be accepted."""
        return [(name, key) for name, entries in self.log.items()
                for key, e in entries.items() if e.get("unconfirmed")]

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
                                      "at": float(e["at"]),
                                      **({"unconfirmed": True} if e.get("unconfirmed") else {})}
                                  for k, e in entries.items()}
