"""Every form a complete histogram bucket can be packed in gives back the same counts per
(row, bucket index): random cells through narrow and decode, forced into each form, and
the form narrow chooses is the smallest."""

from __future__ import annotations

import numpy as np
import pytest

from ray_monitor.aggregator.packing import PAIR, RICE, compact_cells, decode, narrow

ALL_FORMS = range(RICE + 7)  # 4-byte pairs, each gap form, Rice k = 0..6


def _cells(rng: np.random.Generator, rows: int, spread: int, top: int):
    """Cells of ``rows`` rows (numbers up to 999), each 1-40 (index, count) entries."""
    tags, pairs = [], []
    for r in sorted(rng.choice(1000, rows, replace=False).tolist()):
        k = int(rng.integers(1, 40))
        p = np.empty(k, dtype=PAIR)
        p["i"], p["c"] = rng.integers(-spread, spread, k), rng.integers(1, top, k)
        tags.append(np.full(k, r))
        pairs.append(p)
    rows_, lens = np.unique(np.concatenate(tags), return_counts=True)
    return compact_cells(rows_, lens, np.concatenate(pairs))


def _totals(rows, lens, idx, cnt) -> tuple[list, list]:
    """Count per distinct (row, index), in order."""
    key = np.repeat(rows.astype(np.int64), lens) * 2 ** 20 + (idx + 2 ** 17)
    u, inv = np.unique(key, return_inverse=True)
    return u.tolist(), np.bincount(inv.ravel(), weights=cnt).astype(np.int64).tolist()


@pytest.mark.parametrize("spread,top", [(40, 4), (600, 4), (30, 5000), (20000, 300)])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_every_form_decodes_to_the_same_counts(spread, top, rows):
    rng = np.random.default_rng(spread + rows)
    rows_, lens, pairs = _cells(rng, rows, spread, top)
    want = _totals(rows_, lens, pairs["i"].astype(np.int64), pairs["c"].astype(np.int64))
    sizes = {}
    for form in ALL_FORMS:
        if form >= RICE and top > 300:  # a bit per observation: 10**8 bits, not chosen
            continue
        held, head = narrow(rows_, lens, pairs, forms=(form,))
        assert head[0] == form
        sizes[form] = len(held)
        # several slots at once, of one form and of two (as a window reads them)
        other = narrow(rows_[:1], lens[:1], pairs[:lens[0]], forms=(RICE + 2,))
        got_rows, got_lens, idx, cnt, where = decode([(held, head), other, (held, head)])
        for at in (0, 2):
            mine = where == at
            got = _totals(got_rows[mine], got_lens[mine],
                          *(a[np.repeat(mine, got_lens)] for a in (idx, cnt)))
            assert got == want, form
    # rows: a bitmap where most of 0..max are there, else the numbers
    assert (narrow(rows_, lens, pairs)[1][1] == 0) == (rows == 200)
    # narrow alone picks a smallest form (Rice forms only for at most 2 observations an
    # entry: they decode to one entry per observation)
    held, head = narrow(rows_, lens, pairs)
    if pairs["c"].sum() > 2 * len(pairs):
        sizes = {f: n for f, n in sizes.items() if f < RICE}
    assert len(held) == min(sizes.values()), (head, sizes)

