"""A FastAPI ingress under ``@monitor``: counts, errors and latency per route and status code.

    .venv/bin/python examples/fastapi_app.py [--requests 60]

A small book-shop API (``@serve.ingress(app)``) with four routes: a health check, a
catalogue lookup that answers 404 for unknown books, a search, and recommendations that
fail with a 500 for some users (a flaky downstream). ``@monitor`` records each request
under its route template (``GET /books/{book_id}``, not one series per id) with the status
code as outcome; 5xx count as errors, 4xx do not. The example sends a mix of requests,
then prints the monitor's counts per route and status next to its own tally. Starts a
local Ray; about 20 s in all. Exits 0 when the two tallies agree.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

from fastapi import FastAPI, HTTPException
from ray import serve

from ray_monitor import monitor

try:  # imported as examples.NAME (the tests) or run as a script (examples/ on sys.path)
    from examples._local import local_cluster
except ImportError:
    from _local import local_cluster

APP = "bookshop"
BOOKS = {1: "Designing Data-Intensive Applications", 2: "Site Reliability Engineering",
         3: "The Art of Computer Programming", 4: "Structure and Interpretation of "
         "Computer Programs", 5: "Deep Learning"}

api = FastAPI(title="bookshop")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version="2024-06")
@serve.ingress(api)
class Bookshop:
    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/books/{book_id}")
    def book(self, book_id: int) -> dict:
        if book_id not in BOOKS:
            raise HTTPException(status_code=404, detail=f"no book {book_id}")
        return {"id": book_id, "title": BOOKS[book_id]}

    @api.get("/search")
    async def search(self, q: str = "") -> list:
        return [{"id": i, "title": t} for i, t in BOOKS.items() if q.lower() in t.lower()]

    @api.get("/users/{user_id}/recommendations")
    async def recommend(self, user_id: int) -> list:
        if user_id % 7 == 0:  # the flaky downstream: an unhandled error becomes a 500
            raise RuntimeError(f"recommender unavailable for user {user_id}")
        return [BOOKS[1 + (user_id + k) % len(BOOKS)] for k in range(2)]


ROUTES = {"healthz": "GET /healthz", "book": "GET /books/{book_id}", "search": "GET /search",
          "recommend": "GET /users/{user_id}/recommendations"}


def get(url: str) -> int:
    """The HTTP status code of ``GET url``."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def traffic(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` requests as ``(route template, path)``: mostly good, some 404s and 500s."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.choice(("healthz", "book", "book", "search", "recommend", "recommend"))
        if kind == "healthz":
            path = "/healthz"
        elif kind == "book":
            path = f"/books/{rng.randint(1, 7)}"  # 6 and 7 do not exist: 404
        elif kind == "search":
            path = f"/search?q={rng.choice(('data', 'deep', 'program', 'zzz'))}"
        else:
            path = f"/users/{rng.randint(1, 21)}/recommendations"  # 7, 14, 21: 500
        out.append((ROUTES[kind], path))
    return out


def _counts(mon, app: str) -> Counter:
    res = mon.query("count", "requests", 600.0, by=("application", "method", "outcome"))
    out = Counter()
    for key, v in res.items():
        labels = json.loads(key)
        if labels["application"] == app and v:
            out[(labels["method"], labels["outcome"])] = round(v)
    return out


def run(mon, base_url: str, *, app: str = APP, requests: int = 60,
        timeout_s: float = 60.0) -> int:
    """Deploys the API as ``app`` on the running Serve (HTTP at ``base_url``), sends
    ``requests`` requests, prints the monitor's per-route counts; 0 when they agree."""
    serve.run(Bookshop.bind(), name=app, route_prefix=f"/{app}")
    sent = Counter()
    for route, path in traffic(requests):
        sent[(route, str(get(f"{base_url}/{app}{path}")))] += 1
    print(f"sent {requests} requests to {base_url}/{app}")

    deadline = time.monotonic() + timeout_s
    while (seen := _counts(mon, app)) != sent:
        if time.monotonic() > deadline:
            print(f"after {timeout_s:.0f}s the monitor has {dict(seen)}, "
                  f"the client sent {dict(sent)}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    errors = mon.query("error_ratio", "requests", 600.0, by=("application", "method"))
    p50 = mon.query("p50", "latency_seconds", 600.0, by=("application", "method"))

    def of(res: dict, route: str):
        return res.get(json.dumps({"application": app, "method": route}, sort_keys=True))

    print(f"\n{'ROUTE':<40} {'STATUS':<24} {'ERRORS':>7} {'P50(ms)':>8}")
    for route in ROUTES.values():
        statuses = sorted((o, n) for (r, o), n in seen.items() if r == route)
        if not statuses:
            continue
        text = " ".join(f"{o}:{n}" for o, n in statuses)
        print(f"{route:<40} {text:<24} {of(errors, route):>7.0%} {of(p50, route) * 1e3:>8.1f}")
    print("\n404s are the caller's mistake and do not count as errors; 500s do.")
    print(f"the monitor's counts match the client's: {sum(sent.values())} requests")
    print(f"metrics: {mon.metrics_url} (ray_monitor_requests_total{{method=\"GET /books/{{book_id}}\"}}, ...)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests to send (default 60)")
    args = parser.parse_args(argv)
    with local_cluster(gpu=False) as (mon, url):
        return run(mon, url, requests=args.requests)


if __name__ == "__main__":
    sys.exit(main())
