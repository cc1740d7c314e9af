#!/usr/bin/env python
"""Load test of the OpenAI-compatible server on 127.0.0.1: 1, 8, 32 and 64 concurrent clients,
each sending requests back to back, half streaming and half not, with prompts of mixed lengths
that start with one shared system prompt (the paged cache computes it once).

Reports per level: requests/s, completion tokens/s, time to first token and inter-token
latency (p50 and p99, from the streamed requests, as the client sees them), and errors (any
non-200 or broken stream). Writes a JSON file and a PNG plot.

    python scripts/bench_serve.py                     # the bench model, fp32 (~5 min on 2 cores)
    python scripts/bench_serve.py --quick             # a tiny model, 1 and 4 clients (seconds)

The server runs in this process (random weights: speed doesn't depend on them); the clients
run in a forked child process, so parsing their streams doesn't take the server's interpreter
lock.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch
from bench_inference import CountingTokenizer, build_model

from arbor_titan.models.arbor.args import FLAVORS, ArborArgs
from plugins.inference.engine import create_engine
from plugins.inference.server import BackgroundServer, ServerConfig, create_app
from plugins.inference.service import EngineLoop

SYSTEM_PROMPT = "You are a helpful assistant who answers in short sentences. " * 3
TINY = ArborArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=384)


@dataclass
class Level:
    """One concurrency level's results (latencies in milliseconds)."""

    clients: int
    requests: int
    errors: int
    seconds: float
    completion_tokens: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds


def request_body(index: int, max_tokens: int) -> dict:
    """Request `index`: the shared system prompt, then a question of 1 to 8 sentences."""
    question = " ".join(f"Question {index} part {part}." for part in range(1 + index % 8))
    return {
        "prompt": SYSTEM_PROMPT + question,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": index % 2 == 0,
    }


async def _one_request(client, body: dict) -> dict:
    """Send one request; its outcome, tokens, and for a stream the token arrival times."""
    start = time.perf_counter()
    if not body["stream"]:
        response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {response.text[:200]}"}
        return {"tokens": response.json()["usage"]["completion_tokens"], "times": []}
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread())[:200]!r}"}
        done = False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    times.append(time.perf_counter())
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"tokens": len(times), "times": [start, *times]}


async def _level(url: str, clients: int, requests: int, max_tokens: int) -> list[dict]:
    bodies = [request_body(i, max_tokens) for i in range(requests)]
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue = list(reversed(bodies))

        async def worker() -> list[dict]:
            results = []
            while queue:
                try:
                    results.append(await _one_request(client, queue.pop()))
                except Exception as err:  # noqa: BLE001 - a failed request counts as an error
                    results.append({"error": f"{type(err).__name__}: {err}"})
            return results

        per_worker = await asyncio.gather(*(worker() for _ in range(clients)))
    return [result for results in per_worker for result in results]


class Clients:
    """The client process, forked before the server starts any thread (so it inherits no lock
    and imports nothing again), running one level per order."""

    def __init__(self):
        fork = multiprocessing.get_context("fork")
        self._orders, self._results = fork.Queue(), fork.Queue()
        self._process = fork.Process(target=self._serve, daemon=True)
        self._process.start()

    def measure(
        self, url: str, clients: int, requests: int, max_tokens: int
    ) -> tuple[float, list[dict]]:
        """Wall seconds and per-request results of one level."""
        self._orders.put((url, clients, requests, max_tokens))
        return self._results.get()

    def close(self) -> None:
        self._orders.put(None)
        self._process.join(30)

    def _serve(self) -> None:
        while (order := self._orders.get()) is not None:
            start = time.perf_counter()
            results = asyncio.run(_level(*order))
            self._results.put((time.perf_counter() - start, results))


def summarize(clients: int, seconds: float, results: list[dict]) -> Level:
    streamed = [r["times"] for r in results if r.get("times")]
    ttft = [1e3 * (times[1] - times[0]) for times in streamed if len(times) > 1]
    itl = [1e3 * (b - a) for times in streamed for a, b in zip(times[1:], times[2:])]
    errors = sum("error" in r for r in results)
    if errors:
        print(f"  first error: {next(r['error'] for r in results if 'error' in r)}")
    return Level(
        clients,
        len(results),
        errors,
        seconds,
        sum(r.get("tokens", 0) for r in results),
        *percentiles(ttft),
        *percentiles(itl),
    )


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (nearest rank), NaN without values."""
    if not values:
        return float("nan"), float("nan")
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


def plot(levels: list[Level], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [level.clients for level in levels]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("ttft", "o-"), ("itl", "s--")):
        for pct in ("p50", "p99"):
            values = [getattr(level, f"{name}_{pct}_ms") for level in levels]
            latency.plot(clients, values, style, label=f"{name.upper()} {pct}")
    latency.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms")
    latency.set_xticks(clients, [str(c) for c in clients])
    latency.legend()
    throughput.plot(clients, [level.tokens_per_s for level in levels], "o-")
    throughput.set(xscale="log", xlabel="concurrent clients", ylabel="completion tokens/s")
    throughput.set_xticks(clients, [str(c) for c in clients])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 and 4 clients")
    parser.add_argument("--clients", help="comma list of concurrency levels (default 1,8,32,64)")
    parser.add_argument("--requests", type=int, help="requests per level (default 2 per client)")
    parser.add_argument("--max-tokens", type=int, help="tokens each request generates")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_serve"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in (args.clients or ("1,4" if args.quick else "1,8,32,64")).split(",")]
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    clients_process = Clients()
    model_args = TINY if args.quick else FLAVORS["bench"]
    model = build_model(model_args, torch.float32)
    max_len = 512
    engine = create_engine(model, CountingTokenizer(), args.max_batch, max_len)
    loop = EngineLoop(engine).start()
    args.out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{'tiny' if args.quick else 'bench'} model, fp32, --max-batch {args.max_batch}, "
        f"{max_tokens} tokens a request"
    )
    print(
        f"{title}; torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    print(
        "| clients | requests | errors | req/s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results: list[Level] = []
    try:
        with BackgroundServer(create_app(loop, ServerConfig())) as server:
            clients_process.measure(server.url, 1, 2, max_tokens)  # warm-up, not reported
            for clients in levels:
                requests = args.requests or 2 * clients
                seconds, raw = clients_process.measure(server.url, clients, requests, max_tokens)
                level = summarize(clients, seconds, raw)
                results.append(level)
                print(
                    f"| {level.clients} | {level.requests} | {level.errors} | "
                    f"{level.requests_per_s:.2f} | {level.tokens_per_s:.0f} | "
                    f"{level.ttft_p50_ms:.0f} ms | {level.ttft_p99_ms:.0f} ms | "
                    f"{level.itl_p50_ms:.1f} ms | {level.itl_p99_ms:.1f} ms |",
                    flush=True,
                )
            healthy = loop.alive and httpx.get(f"{server.url}/health").status_code == 200
    finally:
        clients_process.close()
        loop.stop()
    (args.out / "bench_serve.json").write_text(
        json.dumps({"title": title, "levels": [asdict(level) for level in results]}, indent=2)
    )
    plot(results, args.out / "bench_serve.png", title)
    errors = sum(level.errors for level in results)
    print(f"errors {errors}; server healthy after the test: {healthy}; plot {args.out}")
    return 0 if errors == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
