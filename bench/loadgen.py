"""The open-loop HTTP load generator of the service benchmarks.

Requests fire at fixed times whatever the answers do, and latency counts from each request's scheduled
time, so queueing shows in the tail. A minimal keep-alive HTTP/1.1 client keeps the generator's own CPU
cost low (it shares the machine with the server); a sweep runs one step per rate and the verdict is the
highest rate whose p99 stays under a bound without errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import uvloop

from bench.serving import vocab

log = logging.getLogger(__name__)

Request = tuple[str, bytes]  # (path, JSON body)
T = TypeVar("T")


class Connection:
    """One keep-alive HTTP/1.1 connection: a minimal client so the generator costs little CPU."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(int(ln.split(":", 1)[1]) for ln in lines if ln.lower().startswith("content-length"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def open_loop(
    host: str, port: int, rate: float, duration_s: float, make: Callable[[int], Request], conns: int = 128
) -> dict[str, Any]:
    """Fire ``rate`` requests/s for ``duration_s``; latency from each request's scheduled time."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await Connection.open(host, port))
    # perf_counter, not loop.time(): uvloop's loop clock ticks in whole milliseconds.
    clock = time.perf_counter
    lat: dict[str, list[float]] = {}
    errors = 0
    statuses: dict[int, int] = {}

    async def one(at: float, req: Request) -> None:
        nonlocal errors
        conn = await pool.get()
        try:
            status, _ = await conn.post(*req)
        finally:
            pool.put_nowait(conn)
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 400:
            errors += 1
        lat.setdefault(req[0], []).append(clock() - at)

    n = int(rate * duration_s)
    start = clock() + 0.05
    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at, make(i))))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    while not pool.empty():
        pool.get_nowait().close()
    everything = [x for xs in lat.values() for x in xs]
    return {
        "rate": rate,
        "sent": n,
        "achieved_rps": n / elapsed,
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        **percentiles(everything),
        "by_route": {path: percentiles(xs) for path, xs in lat.items()},
    }


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop, as the server does: the generator then costs the shared cores less."""
    return uvloop.run(coro)


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50 and p99 in ms of durations in seconds, and how many."""
    if not xs:  # e.g. freshness where no trial ever saw its memory: the report says so, never crashes
        return {"p50_ms": math.nan, "p99_ms": math.nan, "n": 0}
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(xs)}


def mixed_traffic(model: Path, seed: int = 0) -> Callable[[int], Request]:
    """90 % /recommend of known users, 10 % /interactions of one event (random user and item)."""
    users, items = vocab(model)
    rng = random.Random(seed)

    def make(i: int) -> Request:
        user = rng.choice(users)
        if rng.random() < 0.9:
            return "/recommend", json.dumps({"user_id": user, "n": 10}).encode()
        ev = {"user_id": user, "item_id": rng.choice(items)}
        return "/interactions", json.dumps({"events": [ev]}).encode()

    return make


def max_rate(steps: list[dict[str, Any]], p99_ms: float) -> float:
    ok = [s["rate"] for s in steps if s["p99_ms"] <= p99_ms and s["errors"] == 0]
    return max(ok, default=0.0)


def summarise(rate: float, windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One rate's step from its windows: medians of achieved rate, p50 and p99; errors summed."""
    return {
        "rate": rate,
        "sent": sum(w["sent"] for w in windows),
        "errors": sum(w["errors"] for w in windows),
        **{k: float(np.median([w[k] for w in windows])) for k in ("achieved_rps", "p50_ms", "p99_ms")},
        "windows": windows,
    }


def sweep(
    port: int, rates: list[float], duration_s: float, make: Callable[[int], Request], repeats: int = 1
) -> list[Any]:
    """One step per rate: ``repeats`` windows of ``duration_s`` each, summarised by their medians (the
    machine is shared: one window that a host stall lands in does not decide the step alone; every
    window's figures stay in the step)."""
    steps = []
    for rate in rates:
        windows = [run_fast(open_loop("127.0.0.1", port, rate, duration_s, make)) for _ in range(repeats)]
        step = summarise(rate, windows)
        log.info("rate %4.0f/s: p50 %.1f ms p99 %.1f ms (windows %s) errors %d", rate, step["p50_ms"],
                 step["p99_ms"], [round(w["p99_ms"], 1) for w in windows], step["errors"])  # fmt: skip
        steps.append(step)
        if step["p99_ms"] > 500:  # far past saturation: higher rates only queue more
            break
    return steps
