"""Streaming: a text generator served token by token, through a handle and over HTTP.

    .venv/bin/python examples/streaming.py [--requests 6] [--tokens 24]

A bigram language model (trained at start-up on the Zen of Python, which ships with
Python) generates text one word at a time, with a "prefill" pause before the first word
and a shorter pause before each next one, as a large language model does. The same
generator is consumed two ways: ``handle.options(stream=True).generate.remote(...)``
(a Python caller) and ``GET /stream?prompt=...`` (a ``StreamingResponse`` over HTTP).
``@monitor`` times each stream to its last item and records its time to first item; the
example prints both as the monitor saw them next to what the client measured. Starts a
local Ray; about 20 s in all. Exits 0 when the monitor counted every stream.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import random
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from typing import AsyncIterator

from ray import serve

from ray_monitor import monitor

try:  # imported as examples.NAME (the tests) or run as a script (examples/ on sys.path)
    from examples._local import local_cluster
except ImportError:
    from _local import local_cluster

APP = "streaming"
PROMPTS = ("Beautiful is", "Errors should", "Now is", "Simple is", "Special cases",
           "There should")


def corpus() -> str:
    """The Zen of Python, from the standard library (``this`` keeps it rot13-encoded)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
        import this
    return codecs.decode(this.s, "rot13")


class Bigram:
    """A word-level bigram model: the next word is drawn from the words that followed the
    current one in the corpus. Deterministic for a given prompt."""

    def __init__(self, text: str) -> None:
        words = text.replace("\n", " ").split()
        self.follows: dict[str, list[str]] = defaultdict(list)
        for a, b in zip(words, words[1:]):
            self.follows[a.lower()].append(b)
        self.starts = [w for w in words if w[:1].isupper()]

    def tokens(self, prompt: str, n: int):
        rng = random.Random(prompt)
        word = (prompt.split() or [""])[-1].lower()
        for _ in range(n):
            nxt = self.follows.get(word.lower()) or self.starts
            word = rng.choice(nxt)
            yield word


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version="bigram-zen")
class TextGenerator:
    def __init__(self, prefill_s: float = 0.15, per_token_s: float = 0.02) -> None:
        self.model = Bigram(corpus())
        self.prefill_s, self.per_token_s = prefill_s, per_token_s

    async def _stream(self, prompt: str, max_tokens: int) -> AsyncIterator[str]:
        await asyncio.sleep(self.prefill_s)
        for i, word in enumerate(self.model.tokens(prompt, max_tokens)):
            if i:
                await asyncio.sleep(self.per_token_s)
            yield word + " "

    async def generate(self, prompt: str, max_tokens: int = 24) -> AsyncIterator[str]:
        """For handles: ``handle.options(stream=True).generate.remote(prompt)``."""
        async for token in self._stream(prompt, max_tokens):
            yield token

    async def __call__(self, request):
        """``GET /streaming?prompt=...&max_tokens=N``: the tokens as a chunked text/plain body."""
        from starlette.responses import StreamingResponse

        prompt = request.query_params.get("prompt", "")
        n = int(request.query_params.get("max_tokens", "24"))
        return StreamingResponse(self._stream(prompt, n), media_type="text/plain")


def stream_http(url: str) -> tuple[str, float, float]:
    """``(text, seconds to first chunk, seconds in all)`` of one streamed HTTP response."""
    t0 = time.perf_counter()
    first = None
    chunks = []
    with urllib.request.urlopen(url, timeout=60) as resp:
        while chunk := resp.read1(65536):
            first = time.perf_counter() - t0 if first is None else first
            chunks.append(chunk)
    return b"".join(chunks).decode(), first or 0.0, time.perf_counter() - t0


def stream_handle(handle, prompt: str, max_tokens: int) -> tuple[str, float, float]:
    t0 = time.perf_counter()
    first = None
    tokens = []
    for token in handle.options(stream=True).generate.remote(prompt, max_tokens):
        first = time.perf_counter() - t0 if first is None else first
        tokens.append(token)
    return "".join(tokens), first or 0.0, time.perf_counter() - t0


def _by_method(mon, function: str, metric: str, app: str) -> dict:
    res = mon.query(function, metric, 600.0, by=("application", "method"))
    out = {}
    for key, v in res.items():
        labels = json.loads(key)
        if labels["application"] == app:
            out[labels["method"]] = v
    return out


def run(mon, base_url: str, *, app: str = APP, requests: int = 6, tokens: int = 24,
        timeout_s: float = 60.0) -> int:
    """Deploys the generator as ``app`` on the running Serve (HTTP at ``base_url``),
    streams through a handle and over HTTP, prints what the monitor measured; 0 on success."""
    handle = serve.run(TextGenerator.bind(), name=app, route_prefix=f"/{app}")
    client = {"generate": [], "__call__": []}
    for i in range(requests):
        prompt = PROMPTS[i % len(PROMPTS)]
        text, first, total = stream_handle(handle, prompt, tokens)
        client["generate"].append((first, total))
        if i == 0:
            print(f"handle stream, prompt {prompt!r}:\n  {prompt} {text.strip()}")
        query = urllib.parse.urlencode({"prompt": prompt, "max_tokens": tokens})
        text, first, total = stream_http(f"{base_url}/{app}?{query}")
        client["__call__"].append((first, total))
        if i == 0:
            print(f"HTTP stream, prompt {prompt!r}:\n  {prompt} {text.strip()}")

    # Each replica sends what it measured once a second; wait until every stream is in.
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _by_method(mon, "count", "first_item_seconds", app)
        if all(counts.get(m) == requests for m in client):
            break
        if time.monotonic() > deadline:
            print(f"the monitor has {counts} streams with a first item after {timeout_s:.0f}s; "
                  f"expected {requests} per method", file=sys.stderr)
            return 1
        time.sleep(0.5)

    first_p50 = _by_method(mon, "p50", "first_item_seconds", app)
    total_p50 = _by_method(mon, "p50", "latency_seconds", app)
    print(f"\n{requests} streams of {tokens} tokens per way "
          "(p50 as the monitor measured it, in the replica; client p50 in brackets):")
    print(f"  {'METHOD':<10} {'FIRST ITEM':>21} {'WHOLE STREAM':>23}")
    for method, label in (("generate", "handle"), ("__call__", "HTTP")):
        firsts = sorted(f for f, _ in client[method])
        totals = sorted(t for _, t in client[method])
        mid = len(firsts) // 2
        print(f"  {method:<10} {first_p50[method] * 1e3:7.0f} ms [{firsts[mid] * 1e3:5.0f} ms]"
              f" {total_p50[method] * 1e3:9.0f} ms [{totals[mid] * 1e3:5.0f} ms]   ({label})")
    print(f"metrics: {mon.metrics_url} (ray_monitor_request_first_item_seconds, "
          "ray_monitor_request_duration_seconds)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6, help="streams per way (default 6)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per stream (default 24)")
    args = parser.parse_args(argv)
    with local_cluster(gpu=False) as (mon, url):
        return run(mon, url, requests=args.requests, tokens=args.tokens)


if __name__ == "__main__":
    sys.exit(main())
