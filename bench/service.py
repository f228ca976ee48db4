"""Service benchmarks → ``reports/service.json`` and ``reports/service.md``.

* ``load``: an open-loop generator (``bench.loadgen``) on loopback against ``memrec serve`` with the
  Redis backend: 90 % /recommend, 10 % /interactions, at increasing rates. Two floors in the same run:
  the in-process pipeline without HTTP, and a bare FastAPI endpoint under the same generator.
* ``freshness`` (part of ``load``): time from an /interactions answer to the first /recommend answer
  that retrieves the new memory.
* ``drift``: train on the interactions before a time cut, replay the later ones in time order through
  the API (asking /recommend before each one), with live memory updates and with a frozen bank; beside
  it a model-free item-transition reference over the same events, live and frozen (``bench.drift``).

The report is written by ``bench.service_report``; the servers are started by ``bench.serving``.

    python -m bench.service load --model artifacts/beauty
    python -m bench.service drift --cut 0.9 [--vote] [--transitions] [--events N]
    python -m bench.service new-items --cut 0.5 [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.drift import drift_section, run_drift
from bench.loadgen import Connection, max_rate, mixed_traffic, open_loop, percentiles, run_fast, sweep
from bench.new_items import ARMS as NEW_ITEM_ARMS
from bench.new_items import run_new_items
from bench.retrain import run_retrain
from bench.service_report import write_reports
from bench.serving import bare_app_argv, flush, model_card, serve_argv, server, vocab
from bench.swap import run_swap

BENCH_REDIS_URL = "redis://127.0.0.1:6379/12"


async def pipeline_floor(
    model: Path, redis_url: str, requests: int, concurrency: int, nprobe: int
) -> dict[str, Any]:
    """Closed loop on the pipeline alone (no HTTP): throughput and latency of /recommend's work."""
    from service.app import build_runtime
    from service.metrics import Metrics
    from service.pipeline import Query
    from service.settings import Settings

    settings = Settings(model_dir=model, redis_url=redis_url, nprobe=nprobe)  # the server's namespace
    rt = await build_runtime(settings, Metrics())
    users, _ = vocab(model)
    rng = random.Random(1)
    rt.pipeline.start()
    lat: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            await rt.pipeline.recommend(Query(user_id=rng.choice(users)))
            lat.append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        await rt.pipeline.stop()
        await rt.store.close()
    return {"concurrency": concurrency, "rps": len(lat) / elapsed, **percentiles(lat)}


async def freshness(model: Path, port: int, trials: int, seed: int = 2) -> dict[str, Any]:
    """/interactions answer → first /recommend answer whose memories include the new one."""
    _, items = vocab(model)
    rng = random.Random(seed)
    conn = await Connection.open("127.0.0.1", port)
    out: list[float] = []
    misses = 0
    for t in range(trials):
        prefix, target, user = rng.sample(items, 5), rng.choice(items), f"fresh-{seed}-{t}"
        events = [{"user_id": user, "item_id": it} for it in [*prefix, target]]
        await conn.post("/interactions", json.dumps({"events": events}).encode())
        answered = time.perf_counter()
        query = json.dumps({"user_id": f"reader-{t}", "history": prefix, "explain": True, "n": 1}).encode()
        for _ in range(200):
            _, body = await conn.post("/recommend", query)
            if any(m["user_id"] == user for m in json.loads(body)["memories"]):
                out.append(time.perf_counter() - answered)
                break
        else:
            misses += 1
    conn.close()
    return {"trials": trials, "not_seen": misses, **percentiles(out)}


def cpu_jitter(duration_s: float = 5.0) -> dict[str, float]:
    """How long identical ~1.5 ms chunks of pure-Python work take on this machine, 5 ms apart: the
    host's own scheduling noise, which no server on it can beat at the tail."""

    def work() -> int:
        total = 0
        for i in range(20_000):
            total += i * i
        return total

    took: list[float] = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        work()
        took.append(time.perf_counter() - t0)
        time.sleep(0.005)
    a = np.asarray(took) * 1000.0
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
    }


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model)
    flush(BENCH_REDIS_URL)
    env = {"MEMREC_TORCH_THREADS": "1", "MEMREC_LOG_LEVEL": "warning", "MEMREC_WORKERS": str(args.workers)}
    env["MEMREC_NPROBE"] = str(args.nprobe)
    result: dict[str, Any] = {"model": str(model.name), "duration_s": args.duration, "rates": args.rates}
    result |= {"workers": args.workers, "nprobe": args.nprobe, "load_average_at_start": os.getloadavg()[0]}
    result |= {"repeats": args.repeats, "batch_max_wait_ms": args.batch_wait_ms}
    env["MEMREC_BATCH_MAX_WAIT_MS"] = str(args.batch_wait_ms)
    result |= model_card(model)
    result["cpu_jitter"] = cpu_jitter()  # measured on the quiet machine, before the server starts
    with server(serve_argv(model, BENCH_REDIS_URL), env, "/readyz") as port:
        run_fast(open_loop("127.0.0.1", port, 100, 2.0, mixed_traffic(model, 9)))  # warm-up
        steps = sweep(port, args.rates, args.duration, mixed_traffic(model), args.repeats)
        result["steps"] = steps
        result["max_rps_p99_50ms"] = max_rate(steps, 50.0)
        result["max_rps_p99_25ms"] = max_rate(steps, 25.0)
        result["freshness"] = asyncio.run(freshness(model, port, args.freshness_trials))
    with server(bare_app_argv(), {}, "/livez") as port:
        bare = sweep(port, args.rates, args.duration, lambda i: ("/recommend", b"{}"), args.repeats)
        result["floor_bare_fastapi"] = {
            "steps": bare,
            "max_rps_p99_50ms": max_rate(bare, 50.0),
            "max_rps_p99_25ms": max_rate(bare, 25.0),
        }
    result["floor_pipeline"] = run_fast(pipeline_floor(model, BENCH_REDIS_URL, 4000, 32, args.nprobe))
    flush(BENCH_REDIS_URL)
    return result


def replay_args(parser: argparse.ArgumentParser, cut: float) -> None:
    """The options every time-split replay of ml-100k takes (bench.new_items.drift_setup reads them)."""
    parser.add_argument("--data-dir")
    parser.add_argument("--cut", type=float, default=cut)
    parser.add_argument("--events", type=int, help="replay only the first N later events (default: all)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--ft-epochs", type=int, default=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("load", help="open-loop load, floors and freshness")
    lp.add_argument("--model", default="artifacts/beauty")
    lp.add_argument("--rates", type=float, nargs="+", default=[100, 250, 500, 750, 1000, 1500])
    lp.add_argument("--duration", type=float, default=10.0)
    lp.add_argument("--freshness-trials", type=int, default=200)
    lp.add_argument("--workers", type=int, default=1, help="server processes")
    lp.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query")
    lp.add_argument("--repeats", type=int, default=3, help="windows per rate (their medians are reported)")
    lp.add_argument("--batch-wait-ms", type=float, default=3.0, help="the server's micro-batch wait")
    lp.add_argument("--section", default="load", help="report key (e.g. a second model's sweep)")
    dp = sub.add_parser("drift", help="time-split replay, live versus frozen memory")
    replay_args(dp, cut=0.9)
    dp.add_argument("--vote", action="store_true", help="tune the memory vote (report section drift_vote)")
    dp.add_argument(
        "--transitions", action="store_true", help="tune the transition channel (section drift_*transitions)"
    )
    np_ = sub.add_parser("new-items", help="time-split replay with new items: frozen, refused, accepted")
    replay_args(np_, cut=0.5)
    np_.add_argument("--redis-url", help="a Redis database the replay may flush (default: db 14 on loopback)")
    np_.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the model, pooled")
    np_.add_argument("--arms", nargs="+", choices=list(NEW_ITEM_ARMS), help="arms to replay (default: all)")
    np_.add_argument(
        "--section", help="report key, new_items_* (default: new_items_cut<percent>, + _seeds when pooled)"
    )
    rp = sub.add_parser("retrain", help="drift replay with export, warm retrain and hot swap at the midpoint")
    replay_args(rp, cut=0.5)
    sp = sub.add_parser("swap", help="a hot model swap under open-loop load")
    sp.add_argument("--model", default="artifacts/beauty")
    sp.add_argument("--rate", type=float, default=300.0)
    sp.add_argument("--before", type=float, default=15.0, help="seconds of load before the link moves")
    sp.add_argument("--after", type=float, default=75.0, help="seconds of load after it")
    sp.add_argument("--workers", type=int, default=2, help="server processes")
    sp.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    sp.add_argument("--cold", action="store_true", help="no reindex first: the move loads the bank")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "bench.service", *(argv if argv is not None else sys.argv[1:])])
    runners: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "load": run_load,
        "drift": run_drift,
        "new-items": run_new_items,
        "retrain": run_retrain,
        "swap": lambda a: run_swap(
            Path(a.model), BENCH_REDIS_URL, a.rate, a.before, a.after, a.workers, a.threads, not a.cold
        ),
    }
    runner = runners[args.command]
    section = args.section if args.command == "load" else args.command
    if args.command == "drift":
        section = drift_section(args.vote, args.cut, args.transitions)
    if args.command == "swap":
        section = "swap_cold" if args.cold else "swap"
    if args.command in ("new-items", "retrain"):
        section = f"{args.command.replace('-', '_')}_cut{round(args.cut * 100)}"
        if len(getattr(args, "seeds", [0])) > 1:
            section += "_seeds"  # pooled over training seeds, beside the one-seed section
        if getattr(args, "section", None):
            if not args.section.startswith("new_items"):
                parser.error("--section: a new-items report key starts with new_items")
            section = args.section
    write_reports(section, runner(args), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
