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



def _dense_totals(d: np.ndarray, lo: int) -> tuple[list, list]:
    """Count per (row, index) with a count, from a count matrix, in _totals' order."""
    r, j = np.nonzero(d)
    return (r * 2 ** 20 + (j + lo + 2 ** 17)).tolist(), d[r, j].astype(np.int64).tolist()


@pytest.mark.parametrize("spread,top", [(40, 4), (600, 4), (30, 5000), (3000, 300)])
def test_runs_place_every_entry_where_its_row_and_index_say(spread, top, monkeypatch):
    """A window's count matrix places each entry by one cumulative sum of its run's steps
    (Runs.keys): the same counts per (row, index) as the entries spelt out, in every form,
    several slots and forms at once, with rows left out (Runs.take) or past the window's."""
    from ray_monitor.aggregator import window_counts
    from ray_monitor.aggregator.packing import decode_runs
    from ray_monitor.aggregator.window_counts import bucket_counts

    rng = np.random.default_rng(spread * 7 + top)
    rows_, lens, pairs = _cells(rng, 60, spread, top)
    for form in ALL_FORMS:
        if form >= RICE and top > 300:
            continue
        helds = [narrow(rows_, lens, pairs, forms=(form,)),
                 narrow(rows_[:3], lens[:3], pairs[:int(lens[:3].sum())], forms=(RICE + 1,))]
        runs = [r for r, _ in decode_runs(helds)]
        spelt = [(np.repeat(r.rows, n), idx, cnt) for r in runs for idx, cnt, n in [r.entries()]]
        tags, idx, cnt = (np.concatenate(c) for c in zip(*spelt))
        for rows, pick in ((1000, None), (int(rows_[30]), None), (1000, 1)):
            part = [r.take(r.rows % 2 == 1) for r in runs] if pick else runs
            keep = (tags < rows) & ((tags % 2 == 1) if pick else True)
            d, lo, cols = bucket_counts(rows, part)
            assert cols is None and d.shape[0] == rows
            want = _totals(tags[keep], np.ones(int(keep.sum()), dtype=np.int64), idx[keep], cnt[keep])
            assert _dense_totals(d, lo) == want, (form, rows, pick)
            assert lo == int(idx[keep].min()) and lo + d.shape[1] - 1 == int(idx[keep].max())
    # outliers spread too wide for a matrix over every index: the indices counted only
    monkeypatch.setattr(window_counts, "_DENSE_CELLS", 10)
    d, lo, cols = window_counts.bucket_counts(1000, runs)
    assert lo == 0 and cols.tolist() == np.unique(idx).tolist()
    r, j = np.nonzero(d)
    assert _totals(r, np.ones(len(r), dtype=np.int64), cols[j], d[r, j]) == \
        _totals(tags, np.ones(len(tags), dtype=np.int64), idx, cnt)


def test_a_row_without_entries_takes_no_place():
    """Rows packed with no entry (none are, but a read must not rely on it) add nothing
    and do not shift the next row's places."""
    from ray_monitor.aggregator.packing import Runs
    from ray_monitor.aggregator.window_counts import bucket_counts

    steps = np.array([0, 2, 0, 0, 5], dtype=np.uint8)
    for lens in ([2, 0, 1, 2], [2, 1, 2, 0]):
        runs = Runs(np.array([0, 1, 2, 3]), np.array(lens), np.array([1, 1, 4, 3, 2], dtype=np.uint8),
                    first=np.array([10, 50, 7, 20]), steps=steps)
        d, lo, _ = bucket_counts(4, [runs])
        idx, cnt, n = runs.entries()
        want = _totals(np.arange(4), n, idx, cnt)
        assert _dense_totals(d, lo) == want, lens
