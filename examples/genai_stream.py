"""Generative serving: an OpenAI-compatible streaming chat endpoint with two tenants.

    .venv/bin/python examples/genai_stream.py [--requests 4] [--tokens 24]

A word-trigram model, trained at start-up on Python's own help texts
(``pydoc_data.topics``, about 65,000 words that ship with Python), answers
``POST /v1/chat/completions`` in OpenAI's shape: with ``"stream": true`` as Server-Sent
Events of ``chat.completion.chunk`` objects, one word per chunk, and with
``stream_options.include_usage`` a last chunk carrying ``usage`` (a token is a
whitespace-separated word, so the counts are exact and checkable). The tenant is the
``X-Tenant`` header. ``@monitor`` reads the usage by itself; the rule file prices the
model. The example sends streams for two tenants and prints what the monitor measured
(time to first token, time per output token, tokens, tenants, cost) next to what the
client measured. Starts a local Ray; 26 s in all on a quiet 2-core machine. Exits 0 when the monitor's
token counts equal the usage the responses carried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from collections import defaultdict

from ray import serve

from ray_monitor import monitor

try:  # imported as examples.NAME (the tests) or run as a script (examples/ on sys.path)
    from examples._local import local_cluster
except ImportError:
    from _local import local_cluster

APP = "genai"
MODEL = "pydoc-trigram"
TENANTS = ("acme", "globex")
PRICES = {MODEL: {"prompt_per_1k": 0.5, "completion_per_1k": 1.5}}
PROMPTS = ("the for statement", "an exception is raised", "a class definition",
           "the import system")


class Trigram:
    """A word-trigram model of Python's help texts; deterministic per prompt."""

    def __init__(self) -> None:
        from pydoc_data.topics import topics

        words = " ".join(topics.values()).split()
        self.follows: dict[tuple[str, str], list[str]] = defaultdict(list)
        for a, b, c in zip(words, words[1:], words[2:]):
            self.follows[(a, b)].append(c)
        self.keys = list(self.follows)

    def tokens(self, prompt: str, n: int):
        rng = random.Random(prompt)
        w = prompt.split()
        key = tuple(w[-2:]) if len(w) >= 2 and tuple(w[-2:]) in self.follows else \
            rng.choice(self.keys)
        for _ in range(n):
            nxt = rng.choice(self.follows.get(key) or self.follows[rng.choice(self.keys)])
            yield nxt
            key = (key[1], nxt)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version=MODEL, tenant_header="x-tenant")
class ChatServer:
    def __init__(self, prefill_s: float = 0.1, per_token_s: float = 0.015) -> None:
        self.model = Trigram()
        self.prefill_s, self.per_token_s = prefill_s, per_token_s

    async def __call__(self, request):
        """``POST /genai/v1/chat/completions`` (OpenAI's chat completions, streaming or not)."""
        from starlette.responses import JSONResponse, StreamingResponse

        body = await request.json()
        prompt = " ".join(m["content"] for m in body["messages"])
        n = int(body.get("max_tokens", 24))
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                 "total_tokens": len(prompt.split()) + n}
        base = {"id": "chatcmpl-toy", "created": int(time.time()), "model": MODEL}
        if not body.get("stream"):
            await asyncio.sleep(self.prefill_s + n * self.per_token_s)
            text = " ".join(self.model.tokens(prompt, n))
            return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "finish_reason": "length",
                                              "message": {"role": "assistant", "content": text}}]})

        async def events():
            await asyncio.sleep(self.prefill_s)
            for i, word in enumerate(self.model.tokens(prompt, n)):
                if i:
                    await asyncio.sleep(self.per_token_s)
                chunk = {**base, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": word if i == 0 else " " + word}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")


def chat_stream(url: str, tenant: str, prompt: str, n: int) -> dict:
    """One streamed chat completion as the client sees it: times, text and usage."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": n,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                             "X-Tenant": tenant})
    t0 = time.perf_counter()
    times, text, usage, buf = [], [], None, b""
    with urllib.request.urlopen(req, timeout=60) as resp:
        while piece := resp.read1(65536):
            now = time.perf_counter()
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.decode().removeprefix("data: ")
                if data == "[DONE]":
                    continue
                chunk = json.loads(data)
                for c in chunk["choices"]:
                    times.append(now)
                    text.append(c["delta"].get("content", ""))
                usage = chunk.get("usage") or usage
    return {"ttft": times[0] - t0, "tpot": (times[-1] - times[0]) / max(len(times) - 1, 1),
            "text": "".join(text), "usage": usage}


def _by(mon, function: str, metric: str, app: str, label: str, param=None) -> dict:
    out = {}
    for key, v in mon.query(function, metric, 600.0, by=("application", label),
                            param=param).items():
        labels = json.loads(key)
        if labels["application"] == app:
            out[labels[label]] = v
    return out


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def run(mon, base_url: str, *, app: str = APP, requests: int = 4, tokens: int = 24,
        timeout_s: float = 60.0) -> int:
    """Deploys the chat server as ``app``, streams for two tenants, prints the monitor's
    figures next to the client's; 0 when the monitor's token counts are exact."""
    mon.reload({"groups": [], "prices": PRICES})
    serve.run(ChatServer.bind(), name=app, route_prefix=f"/{app}")
    url = f"{base_url}/{app}/v1/chat/completions"
    got = {t: [] for t in TENANTS}
    for i in range(requests):
        for tenant in TENANTS:
            r = chat_stream(url, tenant, PROMPTS[i % len(PROMPTS)], tokens)
            got[tenant].append(r)
            if i == 0 and tenant == TENANTS[0]:
                print(f"{tenant} asked {PROMPTS[0]!r}; the model streamed:\n  {r['text']}\n")
    want_out = {t: sum(r["usage"]["completion_tokens"] for r in rs) for t, rs in got.items()}
    want_in = {t: sum(r["usage"]["prompt_tokens"] for r in rs) for t, rs in got.items()}

    deadline = time.monotonic() + timeout_s
    while _by(mon, "sum", "tenant_output_tokens", app, "tenant") != \
            {t: float(n) for t, n in want_out.items()}:
        if time.monotonic() > deadline:
            print(f"the monitor has {_by(mon, 'sum', 'tenant_output_tokens', app, 'tenant')} "
                  f"output tokens per tenant after {timeout_s:.0f}s; the responses said "
                  f"{want_out}", file=sys.stderr)
            return 1
        time.sleep(0.5)

    everyone = [r for rs in got.values() for r in rs]
    ttft = _by(mon, "p50", "time_to_first_token_seconds", app, "deployment")["ChatServer"]
    tpot = _by(mon, "p50", "time_per_output_token_seconds", app, "deployment")["ChatServer"]
    print(f"{len(everyone)} streams of {tokens} tokens (p50; the monitor measured in the "
          "replica, the client over HTTP):")
    print(f"  time to first token   monitor {ttft * 1e3:6.1f} ms   client "
          f"{_median([r['ttft'] for r in everyone]) * 1e3:6.1f} ms")
    print(f"  time per output token monitor {tpot * 1e3:6.1f} ms   client "
          f"{_median([r['tpot'] for r in everyone]) * 1e3:6.1f} ms")
    tin = _by(mon, "sum", "tenant_input_tokens", app, "tenant")
    tout = _by(mon, "sum", "tenant_output_tokens", app, "tenant")
    cost = _by(mon, "sum", "cost", app, "tenant")
    print(f"  {'TENANT':<8} {'INPUT TOKENS':>21} {'OUTPUT TOKENS':>21} {'COST':>10}")
    for t in TENANTS:
        print(f"  {t:<8} {tin.get(t, 0):7.0f} [usage {want_in[t]:5d}] "
              f"{tout.get(t, 0):7.0f} [usage {want_out[t]:5d}] {cost.get(t, 0):10.5f}")
    print(f"metrics: {mon.metrics_url} (ray_monitor_request_first_item_seconds, "
          "ray_monitor_time_per_output_token_seconds, ray_monitor_output_tokens_total, "
          "ray_monitor_tenant_*, ray_monitor_cost_total)")
    exact = all(tin.get(t) == want_in[t] and tout.get(t) == want_out[t] for t in TENANTS)
    return 0 if exact else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4, help="streams per tenant (default 4)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per stream (default 24)")
    args = parser.parse_args(argv)
    with local_cluster(gpu=False) as (mon, url):
        return run(mon, url, requests=args.requests, tokens=args.tokens)


if __name__ == "__main__":
    sys.exit(main())
