"""What the aggregator keeps across restarts, in Ray's GCS key-value store.

Runs in the aggregator actor. Four keys (:mod:`~ray_monitor.common.names`): the alert and
hint state, written after each evaluation that changed it, so a restarted aggregator
resumes where it stopped; the notification log, written by the notifier's thread before
each notification is sent, so no kill can make it send a firing notification twice; the
rules, receivers and HTTP settings changed after start, which a restarted actor uses
instead of the arguments it was created with; the HTTP port, reused so scrape
configs keep working; and the rule file's token prices, which replicas read for their
spans' cost (:mod:`ray_monitor.replica.prices`). The core never calls Ray: it
is handed ``persist`` / ``load`` callables (:func:`gcs_state`), and tests hand their own.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

from ray_monitor.common.names import (CONFIG_KEY, KV_NAMESPACE, NOTIFY_LOG_KEY, PORT_KEY,
                                     PRICES_KEY, STATE_KEY)

__all__ = ["StateSaver", "gcs_notification_log", "gcs_state", "kv_get", "kv_put", "load_config",
           "load_port", "publish_prices", "restore_state", "save_config", "save_port",
           "shard_key", "state_of"]


logger = logging.getLogger(__name__)


def kv_get(key: bytes) -> Optional[bytes]:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)


def kv_put(key: bytes, value: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)


def publish_prices(prices) -> None:
    """The rule file's token prices where replicas read them (their spans' cost); a failed
    write is logged, never raised: spans then go without their cost."""
    from ray_monitor.alerting.prices import token_prices_json

    try:
        kv_put(PRICES_KEY, token_prices_json(prices))
    except Exception as e:
        logger.warning("ray-monitor aggregator: token prices not published for the replicas' "
                       "spans: %s: %s", type(e).__name__, e)


# -- alert, notification and hint state ---------------------------------------------------

def shard_key(key: bytes, shard: int = 0) -> bytes:
    """A shard's own copy of a state key: shard 0 (and one aggregator) keeps the key itself."""
    return key if not shard else key + b"/shard/" + str(shard).encode()


def gcs_state(shard: int = 0) -> tuple[Callable[[bytes], None], Callable[[], Optional[bytes]]]:
    """(persist, load) of the aggregator's (or one shard's) state in the GCS."""
    key = shard_key(STATE_KEY, shard)
    return (lambda raw: kv_put(key, raw)), (lambda: kv_get(key))


def gcs_notification_log(shard: int = 0
                         ) -> tuple[Callable[[dict], None], Callable[[], Optional[dict]]]:
    """(persist, load) of the notification log in the GCS (the notifier's ``persist_log``);
    each shard sends its own alerts, so each keeps its own log."""
    key = shard_key(NOTIFY_LOG_KEY, shard)

    def load() -> Optional[dict]:
        raw = kv_get(key)
        return json.loads(raw) if raw else None
    return (lambda log: kv_put(key, json.dumps(log).encode())), load


def state_of(engine, hints) -> dict:
    """What a restarted aggregator needs besides the notification log: alert and hint state."""
    return {"alerts": engine.state_dict(), "hints": hints.state_dict()}


def restore_state(state: dict, engine, hints, now: float) -> None:
    """Loads :func:`state_of`'s dict back into a fresh engine and hint engine."""
    engine.restore(state.get("alerts", {}), now=now)
    if state.get("hints"):
        hints.restore(state["hints"])


class StateSaver:
    """Writes the state through ``persist`` when it differs from the last one written or
    restored; the state is compared as sorted JSON, so unchanged rounds cost no write."""

    def __init__(self, persist: Callable[[bytes], None]) -> None:
        self._persist = persist
        self._last: Optional[str] = None

    def save(self, state: dict) -> bool:
        """Writes ``state`` if it changed; True when written. Raises what ``persist``
        raises, and then tries again next time."""
        text = json.dumps(state, sort_keys=True)
        if text == self._last:
            return False
        self._persist(text.encode())
        self._last = text
        return True

    def restored(self, state: dict) -> None:
        """``state`` came from the store: no need to write it back."""
        self._last = json.dumps(state, sort_keys=True)


# -- rules and receivers changed after start; the port ------------------------------------

def load_config() -> dict[str, Any]:
    """``rules_text``, ``rules_file``, ``notifications`` and ``http`` (``host``, ``port``,
    ``token``) as last changed, or {}."""
    raw = kv_get(CONFIG_KEY)
    return json.loads(raw) if raw else {}


def save_config(rules_text: Any, rules_file: Optional[str], notifications: Optional[dict],
                http: Optional[dict] = None) -> None:
    record = {"rules_text": rules_text, "rules_file": rules_file, "notifications": notifications}
    if http is not None:
        record["http"] = http
    kv_put(CONFIG_KEY, json.dumps(record).encode())


def load_port() -> Optional[int]:
    raw = kv_get(PORT_KEY)
    return int(raw) if raw else None


def save_port(port: int) -> None:
    kv_put(PORT_KEY, str(port).encode())
