"""Label spaces of the window store: a metric's series (or its rollups) as rows, their
label values as integer codes, and which rows a query's matchers select and how ``by``
groups them.

Runs in the aggregator actor, under :class:`~ray_monitor.aggregator.rings.Table` (which
decides what a row holds); this module decides only which row a label set has and how
matchers and ``by`` read the rows, with array operations over the codes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ray_monitor.common.matchers import Matcher, matches

__all__ = ["GroupKey", "LabelSpace", "pad_rows"]

#: A group's labels: sorted ``(name, value)`` pairs of the query's ``by``.
GroupKey = tuple[tuple[str, str], ...]

_GROW_ROWS = 2  # rows of capacity a space starts with: rollups are few per metric


def pad_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
    """``a`` with rows of ``fill`` added up to ``rows``."""
    return np.concatenate((a, np.full((rows - a.shape[0],) + a.shape[1:], fill, dtype=a.dtype)))


class LabelSpace:
    """Rows and their label values: a metric's series, or its rollups. Label values are
    also kept as integer codes per label, so matchers and ``by`` run as array operations."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.pos = {n: i for i, n in enumerate(names)}
        self.index: dict[tuple[str, ...], int] = {}
        self.labels: list[Optional[tuple[str, ...]]] = []
        self.free: list[int] = []
        self.updated = np.zeros(0)
        self.live = np.zeros(0, dtype=bool)
        self.codes = np.zeros((0, len(names)), dtype=np.int32)
        #: rows that came or went, counted; per row, that count when it last did: a kept
        #: window rereads only the rows changed since it was read (changed_since)
        self.edits = 0
        self.changed = np.zeros(0, dtype=np.int64)
        self._grouping: dict[tuple, tuple[np.ndarray, list]] = {}  # see _groups_of
        self._recode()

    def _recode(self) -> None:
        self._grouping.clear()
        self.code_of: list[dict[str, int]] = [{} for _ in self.names]
        self.strings: list[list[str]] = [[] for _ in self.names]
        for values, row in self.index.items():
            self._set_codes(row, values)

    def _set_codes(self, row: int, values: tuple[str, ...]) -> None:
        for j, v in enumerate(values):
            c = self.code_of[j].get(v)
            if c is None:
                c = self.code_of[j][v] = len(self.strings[j])
                self.strings[j].append(v)
            self.codes[row, j] = c

    def add(self, values: tuple[str, ...]) -> int:
        if self.free:
            row = self.free.pop()
        else:
            row = len(self.labels)
            self.labels.append(None)
            if row >= len(self.live):
                cap = row + max(_GROW_ROWS, row // 8)  # grows rarely: series come in bursts
                self.updated = pad_rows(self.updated, cap, 0.0)
                self.live = pad_rows(self.live, cap, False)
                self.codes = pad_rows(self.codes, cap, 0)
                self.changed = pad_rows(self.changed, cap, 0)
        self._edit(row)
        self.index[values] = row
        self.labels[row] = values
        self.live[row] = True
        self._set_codes(row, values)
        return row

    def remove(self, row: int) -> None:
        self._edit(row)
        del self.index[self.labels[row]]
        self.labels[row] = None
        self.live[row] = False
        self.free.append(row)

    def _edit(self, row: int) -> None:
        self._grouping.clear()
        self.edits += 1
        self.changed[row] = self.edits

    def changed_since(self, edits: int) -> np.ndarray:
        """Rows that came or went since the space's ``edits`` were ``edits``."""
        if edits == self.edits:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.changed[:len(self.labels)] > edits)

    def forget_codes(self) -> None:
        """Drops codes of values no live row has any more (replica names churn)."""
        if max(map(len, self.strings), default=0) > 2 * len(self.index) + 64:
            self._recode()

    def select(self, matchers: tuple[Matcher, ...],
               by_names: list[str]) -> tuple[np.ndarray, list[GroupKey], np.ndarray]:
        """Live rows matching ``matchers``: (rows, group keys, group index per row); the
        keys are those of every live row's group (a group no selected row is in is unused)."""
        n = len(self.labels)
        ok = self.live[:n].copy()
        for m in matchers:
            j = self.pos.get(m.label)
            if j is None:  # a label the metric lacks reads as ""
                if not matches(m, ""):
                    ok[:] = False
                continue
            if m.op in ("=", "!="):  # equality: one code, no string compared
                truth = np.full(len(self.strings[j]), m.op == "!=")
                c = self.code_of[j].get(m.value)
                if c is not None:
                    truth[c] = m.op == "="
            else:
                truth = np.fromiter((matches(m, v) for v in self.strings[j]), dtype=bool,
                                    count=len(self.strings[j]))
            ok &= truth[self.codes[:n, j]]
        rows = np.flatnonzero(ok)
        cols = tuple(self.pos[b] for b in by_names if b in self.pos)
        if not len(rows):
            return rows, [], np.zeros(0, dtype=np.int64)
        if not cols:
            return rows, [tuple((b, "") for b in by_names)], np.zeros(len(rows), dtype=np.int64)
        gid, all_keys = self._groups_of(cols, by_names)
        return rows, all_keys, gid[rows]  # keys of every group: callers index the used ones

    def _groups_of(self, cols: tuple[int, ...], by_names: list[str]) -> tuple[np.ndarray, list]:
        """Every live row's group under ``by`` (ids in the order of the groups' codes) and
        the group keys; kept until a row comes or goes, so every matcher set of a round
        shares one grouping."""
        hit = self._grouping.get((cols, tuple(by_names)))
        if hit is not None:
            return hit
        n = len(self.labels)
        live = np.flatnonzero(self.live[:n])
        gid = np.full(n, -1, dtype=np.int64)
        keys: list[GroupKey] = []
        if len(live):
            combos, inv = _unique_rows(self.codes[live][:, list(cols)])
            gid[live] = inv.ravel()
            # label by label, not group by group: 500 groups' keys in a fifth of the time
            values = {self.names[j]: [self.strings[j][c] for c in codes]
                      for j, codes in zip(cols, combos.T.tolist())}
            keys = list(zip(*[[(b, v) for v in values[b]] if b in values else
                              [(b, "") for _ in range(len(combos))] for b in by_names]))
        self._grouping[(cols, tuple(by_names))] = (gid, keys)
        return gid, keys


def _unique_rows(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(sub, axis=0, return_inverse=True)`` for non-negative codes, a tenth of
    its time: each row as one int64 (same order), where that fits."""
    sub = sub.astype(np.int64)
    tops = [int(c.max()) + 1 for c in sub.T]
    if float(np.prod(tops, dtype=np.float64)) >= 2.0 ** 62:
        return np.unique(sub, axis=0, return_inverse=True)
    flat = sub[:, 0].copy()
    for j in range(1, sub.shape[1]):
        flat = flat * tops[j] + sub[:, j]
    _, first, inv = np.unique(flat, return_index=True, return_inverse=True)
    return sub[first], inv
