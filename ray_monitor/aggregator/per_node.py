"""Actors kept one per node by the aggregator: started, pinned, forgotten with their node.

Runs in the aggregator actor, which calls ``reconcile()`` every few seconds for each kind
(GPU-stats actors, node mergers). It decides where such actors run: one per alive node
that wants one, pinned there with hard node affinity, so an actor whose node dies is
never re-created elsewhere. The actors are owned by whoever calls ``reconcile()`` and
share its fate; a restarted aggregator finds those still running by name.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["PerNodeActors"]

log = logging.getLogger(__name__)


class PerNodeActors:
    """One actor per alive node (of those ``wanted``); subclasses say how one starts."""

    #: What the log calls these actors.
    label = "per-node actors"

    def __init__(self, *, namespace: str,
                 list_nodes: Callable[[], list[dict]] = ray.nodes) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be the monitor's Ray namespace (a non-empty string), got {namespace!r}")
        if not callable(list_nodes):
            raise TypeError(f"list_nodes must be a callable returning ray.nodes()-shaped dicts, got {list_nodes!r}")
        self._namespace = namespace
        self._list_nodes = list_nodes
        self._actors: dict[str, Any] = {}
        self._failed: set[str] = set()  # causes already logged

    def pinned(self, name: str, node_id: str) -> dict[str, Any]:
        """The ``.options()`` every per-node actor takes: named (a restarted aggregator
        finds those still running), zero resources, restarted by Ray on its node only
        (soft=False: never placed, nor restarted, on any other node)."""
        return dict(name=name, namespace=self._namespace, get_if_exists=True, num_cpus=0,
                    max_restarts=-1,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id,
                                                                       soft=False))

    def actors(self) -> dict[str, Any]:
        """node_id -> actor handle, for the nodes that were alive at the last reconcile."""
        return dict(self._actors)

    def has(self, node_id: str) -> bool:
        return node_id in self._actors

    def reconcile(self, wanted: Optional[Iterable[str]] = None) -> tuple[list[str], list[str]]:
        """Starts actors on alive nodes that have none (of ``wanted`` only, when given),
        forgets those of dead nodes; returns (started, forgotten)."""
        try:
            alive = {n["NodeID"] for n in self._list_nodes() if n.get("Alive")}
        except Exception as exc:
            self._log_once(f"list_nodes:{type(exc).__name__}", exc)
            return [], []
        targets = alive if wanted is None else alive & set(wanted)
        started, forgotten = [], []
        for node_id in sorted(targets - self._actors.keys()):
            try:
                self._actors[node_id] = self._start(node_id)
                started.append(node_id)
            except Exception as exc:  # e.g. the node died meanwhile: try again next reconcile
                self._log_once(f"start:{type(exc).__name__}", exc)
        for node_id in sorted(self._actors.keys() - alive):
            handle = self._actors.pop(node_id)
            forgotten.append(node_id)
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass  # the node and its actor are already gone
        if started or forgotten:
            log.info("%s: started on %s, forgotten for %s", self.label, started, forgotten)
        return started, forgotten

    def kill_all(self) -> None:
        handles = list(self._actors.values())
        self._actors.clear()
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass

    def _start(self, node_id: str) -> Any:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    def _log_once(self, cause: str, exc: BaseException) -> None:
        if cause not in self._failed:
            self._failed.add(cause)
            log.warning("%s: %s (%s); logged once", self.label, cause, exc)
