"""Serving under load: static against continuous batching, on loopback, with an open-loop load.

``unimoe serve``'s app runs in this process (uvicorn on 127.0.0.1, a random-weight model) once with
``batching="static"`` (a window gathers requests, each batch runs whole) and once with
``batching="continuous"`` (requests join and leave the batch at every step). A load generator sends
streamed chat requests with Poisson arrivals at each ``--rates`` (requests per second): a third with
an image, a third with a speech clip, a third text only; prompts of mixed length; ``max_tokens`` drawn
from 8, 32 and 96. The same request list (same seed) goes to both modes at a rate, in alternating
order. Reported per mode and rate: throughput (generated tokens per second, first arrival to last
answer), and p50/p99 of time to first token and of end-to-end latency, median over ``--repeats``.

The summary is taken at the lowest rate where static batching's p99 latency is at least twice its
p99 at the lowest rate (its knee): ``throughput_ratio`` (continuous / static) and ``p99_ratio``
(continuous / static). Target: throughput ratio at least 2 with a p99 ratio at most 1. Where the knee
comes before static batching saturates, both modes serve the offered load and the throughput ratio
is near 1; the summary also gives the ratios at the highest rate and the best throughput ratio.

Run: ``python benchmarks/serve.py [--quick] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from common import environment, format_table, write_json
from generate import build_engine, mid_config

from unimoe.inference.server import ServerConfig, create_app
from unimoe.presets import tiny

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
MODES = ("static", "continuous")
RESULT_KEYS = (
    "rate",
    "mode",
    "requests",
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
)


def requests(count: int, seed: int) -> list[dict]:
    """Chat request bodies: mixed media, prompt lengths and answer limits."""
    rng = np.random.default_rng(seed)
    photo = base64.b64encode((FIXTURES / "photo.jpg").read_bytes()).decode()
    speech = base64.b64encode((FIXTURES / "speech.wav").read_bytes()).decode()
    bodies = []
    for i in range(count):
        text = f"Request {i}: " + "please describe it in detail " * int(rng.integers(1, 12))
        content: list[dict] = [{"type": "text", "text": text}]
        kind = i % 3
        if kind == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + photo}})
        elif kind == 1:
            content.insert(0, {"type": "input_audio", "input_audio": {"data": speech, "format": "wav"}})
        bodies.append(
            {
                "model": "bench",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": int(rng.choice([8, 32, 96])),
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


class Server:
    """The app on a free loopback port in a background thread."""

    def __init__(self, engine, mode: str, max_rows: int) -> None:
        import uvicorn

        config = ServerConfig(batching=mode, max_batch_size=max_rows, max_queue=1024, timeout=600)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


async def _one(client, url: str, body: dict, start: float, out: dict) -> None:
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    done = time.perf_counter()
    out.update(sent=sent, ttft=(first or done) - sent, e2e=done - sent, done=done, tokens=tokens)


async def _load(url: str, bodies: list[dict], rate: float, seed: int) -> list[dict]:
    import httpx

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(bodies))
    begin = time.perf_counter() + 0.2
    starts = begin + np.cumsum(gaps) - gaps[0]
    results = [{} for _ in bodies]
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(_one(client, url, b, s, r) for b, s, r in zip(bodies, starts, results)))
    return results


def _summary(results: list[dict]) -> dict:
    span = max(r["done"] for r in results) - min(r["sent"] for r in results)
    ttft = [1000 * r["ttft"] for r in results]
    e2e = [1000 * r["e2e"] for r in results]
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / span,
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p99_ms": float(np.percentile(ttft, 99)),
        "e2e_p50_ms": float(np.percentile(e2e, 50)),
        "e2e_p99_ms": float(np.percentile(e2e, 99)),
    }


def measure(engine, args: argparse.Namespace) -> list[dict]:
    servers = {mode: Server(engine, mode, args.max_rows) for mode in MODES}
    rows = []
    for server in servers.values():
        server.__enter__()
    try:
        warm = requests(4, seed=99)
        for server in servers.values():
            asyncio.run(_load(server.url, warm, 50.0, 0))
        for rate in args.rates:
            per_mode: dict[str, list[dict]] = {m: [] for m in MODES}
            for repeat in range(args.repeats):
                bodies = requests(args.requests, seed=repeat)
                order = MODES if repeat % 2 == 0 else MODES[::-1]
                for mode in order:
                    per_mode[mode].append(
                        _summary(asyncio.run(_load(servers[mode].url, bodies, rate, repeat)))
                    )
            for mode in MODES:
                medians = {k: statistics.median(s[k] for s in per_mode[mode]) for k in per_mode[mode][0]}
                rows.append({"rate": rate, "mode": mode, "requests": args.requests, **medians})
                print(f"rate {rate:g}/s {mode}: {medians}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.__exit__()
    return rows


def knee_summary(rows: list[dict]) -> dict:
    """Ratios at the lowest rate where static p99 latency at least doubles its lowest-rate value."""
    static = {r["rate"]: r for r in rows if r["mode"] == "static"}
    continuous = {r["rate"]: r for r in rows if r["mode"] == "continuous"}
    rates = sorted(static)
    base = static[rates[0]]["e2e_p99_ms"]
    knee = next((rate for rate in rates if static[rate]["e2e_p99_ms"] >= 2 * base), rates[-1])
    top = rates[-1]
    return {
        "knee_rate": knee,
        "static_p99_doubled": static[knee]["e2e_p99_ms"] >= 2 * base,
        "throughput_ratio": continuous[knee]["tokens_per_s"] / static[knee]["tokens_per_s"],
        "p99_ratio": continuous[knee]["e2e_p99_ms"] / static[knee]["e2e_p99_ms"],
        "highest_rate": top,
        "throughput_ratio_at_highest_rate": continuous[top]["tokens_per_s"] / static[top]["tokens_per_s"],
        "p99_ratio_at_highest_rate": continuous[top]["e2e_p99_ms"] / static[top]["e2e_p99_ms"],
        "best_throughput_ratio": max(
            continuous[r]["tokens_per_s"] / static[r]["tokens_per_s"] for r in rates
        ),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per rate and mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-rows", type=int, default=8, help="rows per batch in both modes")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer rates and requests (about 3 minutes)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.requests, args.repeats = [4, 16, 64], 24, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), torch.float32
    engine = build_engine(tiny() if args.shape == "tiny" else mid_config(), device, dtype)
    rows = measure(engine, args)
    print(format_table(RESULT_KEYS, [[r[k] for k in RESULT_KEYS] for r in rows]))
    summary = knee_summary(rows)
    print("summary:", json.dumps(summary))
    if args.json:
        payload = {
            "environment": environment(device, dtype, args.threads),
            "shape": args.shape,
            "results": rows,
        }
        write_json(args.json, {**payload, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
