"""Runs in the aggregator: the join of captured predictions with ground-truth feedback
that arrives later, by request id.

The aggregator feeds the :class:`~ray_monitor.quality.prediction.Prediction` values that
replicas ship and the feedback items that users send (``POST /api/v1/feedback``,
``record_feedback``) to one :class:`FeedbackJoin`. It decides, per feedback item, whether
it joins, waits for its prediction, or is refused (:class:`ItemStatus`), and when a
waiting prediction expires or is dropped to bound memory. Every join comes out as a
:class:`LabeledOutcome`, which :class:`~ray_monitor.quality.metrics.QualityAccumulator`
counts.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

from ray_monitor.quality.prediction import MAX_STRING, Prediction, check_label, check_number

__all__ = ["FeedbackJoin", "FeedbackResult", "ItemStatus", "LabeledOutcome"]

_FEEDBACK_KEYS = frozenset({"request_id", "label", "value"})


class LabeledOutcome(NamedTuple):
    """A prediction joined with its ground truth (``label`` or ``value``) at ``joined_at``."""

    prediction: Prediction
    label: Optional[str]
    value: Optional[float]
    joined_at: float


class ItemStatus(NamedTuple):
    """What became of one feedback item; ``reason`` says why for anything but ``joined``."""

    index: int
    request_id: Optional[str]
    status: str  # joined | held | duplicate | unknown | expired | dropped | invalid
    reason: str = ""


#: Items that did not join listed in an answer; all are counted.
MAX_PROBLEMS_SHOWN = 100
#: Items whose status a result keeps one by one (all are counted): a 100,000-item batch
#: costs no 100,000 more objects.
MAX_ITEMS_KEPT = 10_000


@dataclass
class FeedbackResult:
    """The answer to one :meth:`FeedbackJoin.add_feedback` call: every item counted by
    status, the first MAX_ITEMS_KEPT kept one by one, and the first MAX_PROBLEMS_SHOWN
    that did not join."""

    items: list[ItemStatus] = field(default_factory=list)
    outcomes: list[LabeledOutcome] = field(default_factory=list)
    by_status: dict[str, int] = field(default_factory=dict)
    problems: list[ItemStatus] = field(default_factory=list)
    problems_total: int = 0

    def add(self, item: ItemStatus) -> None:
        self.by_status[item.status] = self.by_status.get(item.status, 0) + 1
        if len(self.items) < MAX_ITEMS_KEPT:
            self.items.append(item)
        if item.status != "joined":
            self.problems_total += 1
            if len(self.problems) < MAX_PROBLEMS_SHOWN:
                self.problems.append(item)

    def counts(self) -> dict[str, int]:
        return dict(self.by_status)

    def as_dict(self, limit: int = MAX_PROBLEMS_SHOWN) -> dict:
        """The HTTP API's body: counts by status, and the first ``limit`` items that did
        not join (``problems_omitted`` says how many more), so a large batch gets a
        small answer."""
        out = {"counts": self.counts(), "problems": [_shown(it) for it in self.problems[:limit]]}
        if self.problems_total > limit:
            out["problems_omitted"] = self.problems_total - limit
        return out


def _shown(it: ItemStatus) -> dict:
    d = it._asdict()
    rid = d["request_id"]
    if isinstance(rid, str) and len(rid) > 128:
        d["request_id"] = rid[:128] + "..."
    return d


_REASONS = {
    "duplicate": "this request already has ground truth; the first one is kept",
    "unknown": "no prediction was captured for this request id (not a monitored deployment "
               "with a prediction extractor, or a wrong id)",
    "expired": "the prediction is older than the feedback horizon and was let go",
    "dropped": "the prediction was dropped to bound memory (more predictions waiting than "
               "max_pending); raise max_pending or send feedback sooner",
    "held": "no prediction with this id yet: held for early_grace_s seconds in case it is "
            "still on its way from the replica",
}


class FeedbackJoin:
    """Joins predictions with ground truth that arrives later, by request id.

    A prediction waits up to ``horizon_s`` after its ``time`` for its truth; past that it
    expires (counted). At most ``max_pending`` predictions wait; past that the oldest is
    dropped (counted). Feedback for an id whose prediction has not arrived yet (replicas
    flush every second or so) is held ``early_grace_s`` seconds, then counted as unknown.
    The fate of the last ``max_pending`` ids that left (joined with its truth, expired,
    dropped) is remembered so late feedback is told apart from a wrong id, and a second
    label for a joined id is a ``duplicate``: counted, and the first label kept, because
    the first answer is what any outcome already emitted was computed from.

    Several predictions may share an id (a request through two monitored deployments):
    the truth joins each of them whose kind (label or value) it matches.
    Memory: at most ``max_pending`` waiting predictions, held feedback items and
    remembered fates each, whatever the traffic. Expiry sweeps from the oldest arrival
    and stops at the first live one; a straggler behind it expires when its feedback comes.
    Not thread-safe: the aggregator calls it from one thread.
    """

    def __init__(self, *, horizon_s: float = 3600.0, max_pending: int = 100_000,
                 early_grace_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        if not (isinstance(horizon_s, (int, float)) and horizon_s > 0):
            raise ValueError(f"horizon_s must be a positive number of seconds, got {horizon_s!r}")
        if not (isinstance(max_pending, int) and max_pending >= 1):
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if not (isinstance(early_grace_s, (int, float)) and early_grace_s >= 0):
            raise ValueError("early_grace_s must be a number of seconds >= 0 (0: report "
                             f"unknown ids at once), got {early_grace_s!r}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._horizon, self._max, self._grace = float(horizon_s), max_pending, float(early_grace_s)
        self._clock = clock
        self._pending: OrderedDict[str, list[Prediction]] = OrderedDict()
        self._n_pending = 0
        # id -> (fate, truth label, truth value); truth kept so a late second prediction joins
        self._done: OrderedDict[str, tuple[str, Optional[str], Optional[float]]] = OrderedDict()
        self._held: OrderedDict[str, tuple[float, Optional[str], Optional[float]]] = OrderedDict()
        self._counts = dict.fromkeys((
            "predictions", "predictions_joined", "predictions_expired", "predictions_dropped",
            "predictions_kind_mismatch", "feedback_joined", "feedback_duplicate",
            "feedback_unknown", "feedback_expired", "feedback_dropped", "feedback_invalid"), 0)

    def stats(self) -> dict[str, int]:
        """Counters since start (final fates), and the ``pending`` / ``held`` gauges."""
        return {**self._counts, "pending": self._n_pending, "held": len(self._held)}

    def _forget(self, rid: str, fate: str, label=None, value=None) -> None:
        self._done[rid] = (fate, label, value)
        self._done.move_to_end(rid)
        while len(self._done) > self._max:
            self._done.popitem(last=False)

    def _sweep(self, now: float) -> None:
        # Ids are in arrival order, close to time order: stop at the first one still waiting;
        # an out-of-order straggler is caught when its feedback comes, and memory stays bounded.
        while self._pending:
            rid, preds = next(iter(self._pending.items()))
            if now - min(p.time for p in preds) <= self._horizon:
                break
            self._pending.popitem(last=False)
            self._n_pending -= len(preds)
            self._counts["predictions_expired"] += len(preds)
            self._forget(rid, "expired")
        while self._held:
            rid, (arrived, _, _) = next(iter(self._held.items()))
            if now - arrived <= self._grace:
                break
            self._held.popitem(last=False)
            self._counts["feedback_unknown"] += 1

    def _unpend(self, rid: str, fate: str, label=None, value=None) -> None:
        self._n_pending -= len(self._pending.pop(rid))
        self._forget(rid, fate, label, value)

    def _join(self, preds: list[Prediction], label, value, now: float) -> list[LabeledOutcome]:
        out = [LabeledOutcome(p, label, value, now) for p in preds if _fits(p, label)]
        self._counts["predictions_joined"] += len(out)
        self._counts["predictions_kind_mismatch"] += len(preds) - len(out)
        return out

    def add_predictions(self, preds: Iterable[Prediction]) -> list[LabeledOutcome]:
        """Adds captured predictions; returns those that joined feedback already here
        (held early feedback, or the truth of a sibling prediction with the same id)."""
        now = self._clock()
        self._sweep(now)
        out: list[LabeledOutcome] = []
        for p in preds:
            self._counts["predictions"] += 1
            done = self._done.get(p.request_id)
            if now - p.time > self._horizon:
                self._counts["predictions_expired"] += 1
                if done is None:
                    self._forget(p.request_id, "expired")
                continue
            if done is not None and done[0] == "joined":
                out += self._join([p], done[1], done[2], now)
                continue
            held = self._held.pop(p.request_id, None)
            if held is not None:
                if _fits(p, held[1]):
                    self._counts["feedback_joined"] += 1
                    self._forget(p.request_id, "joined", held[1], held[2])
                    out += self._join([p], held[1], held[2], now)
                    continue
                self._counts["feedback_invalid"] += 1  # truth of the wrong kind: let it go
            self._pending.setdefault(p.request_id, []).append(p)
            self._n_pending += 1
            while self._n_pending > self._max:
                rid, old = self._pending.popitem(last=False)
                self._n_pending -= len(old)
                self._counts["predictions_dropped"] += len(old)
                self._forget(rid, "dropped")
        return out

    def known(self, request_ids: Iterable[Any]) -> list[str]:
        """The ids of ``request_ids`` this join has a prediction of (waiting or joined):
        a sharded monitor sends each feedback item to the shard that holds its prediction."""
        return [r for r in request_ids if isinstance(r, str)
                and (r in self._pending or r in self._done)]

    def held_ids(self, limit: int) -> list[str]:
        """The request ids of held feedback (no prediction here yet), oldest first, at
        most ``limit``: a sharded monitor's front asks the other shards for them."""
        return list(itertools.islice(self._held, limit))

    def release(self, request_ids: Iterable[str]) -> list[tuple]:
        """Lets held feedback go without counting it (its prediction is on another shard,
        which joins it): ``(request_id, arrived, label, value)`` for each id held."""
        out = []
        for rid in request_ids:
            entry = self._held.pop(rid, None)
            if entry is not None:
                out.append((rid, *entry))
        return out

    def hold(self, released: Iterable[tuple]) -> None:
        """Puts back what :meth:`release` gave (the owner did not answer), as it was:
        its grace still counts from when it first arrived."""
        for rid, arrived, label, value in released:
            if rid not in self._held and rid not in self._pending and rid not in self._done:
                self._held[rid] = (arrived, label, value)
        # oldest first again, so the sweep still stops at the first one in its grace
        self._held = OrderedDict(sorted(self._held.items(), key=lambda kv: kv[1][0]))

    def add_feedback(self, items: Iterable[Any], *, result: Optional[FeedbackResult] = None,
                     start: int = 0) -> FeedbackResult:
        """Joins ground truth, one dict per item: ``{"request_id": ..., "label": ...}`` or
        ``{"request_id": ..., "value": ...}``. Never raises for a bad item: each gets its
        :class:`ItemStatus`, and the valid rest of the batch lands. A large batch can come
        in parts: ``result`` collects them, ``start`` is the index of the part's first item."""
        if isinstance(items, (Mapping, str, bytes)):
            raise TypeError("add_feedback takes a list of feedback items; wrap a single item "
                            "in a list")
        now = self._clock()
        self._sweep(now)
        result = FeedbackResult() if result is None else result
        for i, item in enumerate(items, start):
            try:
                rid, label, value = _parse_feedback(item)
            except (TypeError, ValueError) as e:
                rid = item.get("request_id") if isinstance(item, Mapping) else None
                self._item(result, i, rid if isinstance(rid, str) else None, "invalid", str(e))
                continue
            preds = self._pending.get(rid)
            if preds is not None:
                if now - min(p.time for p in preds) > self._horizon:
                    self._unpend(rid, "expired")
                    self._counts["predictions_expired"] += len(preds)
                    self._item(result, i, rid, "expired")
                elif not any(_fits(p, label) for p in preds):
                    # keep the predictions: the right kind of truth may still come
                    want = "label" if preds[0].label is not None else "value"
                    self._item(result, i, rid, "invalid",
                               "the prediction for this request is a "
                               f"{'class label' if want == 'label' else 'regression value'}; "
                               f'send "{want}"')
                else:
                    self._unpend(rid, "joined", label, value)
                    result.outcomes += self._join(preds, label, value, now)
                    self._item(result, i, rid, "joined")
            elif rid in self._done:
                fate = self._done[rid][0]
                self._item(result, i, rid, "duplicate" if fate == "joined" else fate)
            elif rid in self._held:
                self._item(result, i, rid, "duplicate")
            elif self._grace > 0:
                self._held[rid] = (now, label, value)
                while len(self._held) > self._max:
                    self._held.popitem(last=False)
                    self._counts["feedback_unknown"] += 1
                self._item(result, i, rid, "held")
            else:
                self._item(result, i, rid, "unknown")
        return result

    def _item(self, result: FeedbackResult, i: int, rid: Optional[str], status: str,
              reason: str = "") -> None:
        if status != "held":
            self._counts["feedback_" + status] += 1
        result.add(ItemStatus(i, rid, status, reason or _REASONS.get(status, "")))


def _fits(p: Prediction, truth_label: Optional[str]) -> bool:
    """Whether a truth (a label, or else a value) is of the prediction's kind."""
    return (p.label is not None) == (truth_label is not None)


def _parse_feedback(item: Any) -> tuple[str, Optional[str], Optional[float]]:
    if not isinstance(item, Mapping):
        raise TypeError('a feedback item must be an object such as {"request_id": "...", '
                        f'"label": "spam"}}, got {type(item).__name__}')
    unknown = set(item) - _FEEDBACK_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}; a feedback item has "
                         '"request_id" and one of "label" or "value"')
    rid = item.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_STRING:
        raise ValueError('"request_id" must be the non-empty X-Request-ID string of the '
                         f"request, got {rid!r:.60}")
    has_label, has_value = item.get("label") is not None, item.get("value") is not None
    if has_label == has_value:
        raise ValueError('a feedback item needs exactly one of "label" (classification) and '
                         '"value" (regression)')
    if has_label:
        return rid, check_label(item["label"], "feedback label"), None
    return rid, None, check_number(item["value"], "feedback value")
