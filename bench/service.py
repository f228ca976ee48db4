"""Service benchmarks → ``reports/service.json`` and ``reports/service.md``.

* ``load``: an open-loop generator (requests fire at fixed times whatever the answers do, and latency
  counts from the scheduled time, so queueing shows in the tail) on loopback against ``memrec serve``
  with the Redis backend: 90 % /recommend, 10 % /interactions, at increasing rates. Two floors in the
  same run: the in-process pipeline without HTTP, and a bare FastAPI endpoint under the same generator.
* ``freshness``: time from an /interactions answer to the first /recommend answer that retrieves the new
  memory.
* ``drift``: train on the interactions before a time cut, replay the later ones in time order through
  the API (asking /recommend before each one), with live memory updates and with a frozen bank; beside
  it a model-free item-transition reference over the same events, live and frozen.

    python -m bench.service load --model artifacts/beauty
    python -m bench.service drift --cut 0.9 [--vote] [--transitions] [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import uvloop

from bench.common import REPORTS, ROOT, machine, machine_label

log = logging.getLogger("bench.service")

BENCH_REDIS_URL = "redis://127.0.0.1:6379/12"
DRIFT_REDIS_URL = "redis://127.0.0.1:6379/13"
Request = tuple[str, bytes]  # (path, JSON body)
T = TypeVar("T")


# ------------------------------------------------------------------------------------ HTTP client


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
        **_percentiles(everything),
        "by_route": {path: _percentiles(xs) for path, xs in lat.items()},
    }


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop, as the server does: the generator then costs the shared cores less."""
    return uvloop.run(coro)


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:  # e.g. freshness where no trial ever saw its memory: the report says so, never crashes
        return {"p50_ms": math.nan, "p99_ms": math.nan, "n": 0}
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(xs)}


# ----------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def launch(
    argv: list[str], env: dict[str, str], ready_path: str, out: IO[bytes], timeout_s: float = 900.0
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server subprocess on a free port (``{port}`` in argv is replaced), output to ``out``;
    returns it and its port once ``ready_path`` answers 200. Stopping it is the caller's."""
    import httpx

    port = _free_port()
    cmd = [a.replace("{port}", str(port)) for a in argv]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            out.seek(0)
            raise RuntimeError(f"server exited: {out.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server not ready in time")
        time.sleep(0.5)


@contextmanager
def server(argv: list[str], env: dict[str, str], ready_path: str, timeout_s: float = 900.0) -> Iterator[int]:
    """A server subprocess on a free port; yields the port once ready, stops it afterwards."""
    with tempfile.TemporaryFile() as out:
        proc, port = launch(argv, env, ready_path, out, timeout_s)
        try:
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _vocab(model: Path) -> tuple[list[str], list[str]]:
    v = json.loads((model / "vocab.json").read_text(encoding="utf-8"))
    return list(v["users"]), list(v["items"])


def model_card(model: Path) -> dict[str, Any]:
    """What identifies the served model: its version, dataset, bank size and fine-tuning depth."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    metrics, finetune = config.get("metrics", {}), config.get("finetune", {})
    return {
        "model_version": config.get("model_version", ""),
        "bank_memories": metrics.get("memories"),
        "k": finetune.get("k"),
        "vote": {k: finetune.get(f"vote_{k}", 0) for k in ("weight", "temperature", "depth")},
        "transition_weight": finetune.get("transition_weight", 0.0),
        "objective": config.get("train", {}).get("objective"),
        "scheme": config.get("train", {}).get("scheme"),
    }


def mixed_traffic(model: Path, seed: int = 0) -> Callable[[int], Request]:
    """90 % /recommend of known users, 10 % /interactions of one event (random user and item)."""
    users, items = _vocab(model)
    rng = random.Random(seed)

    def make(i: int) -> Request:
        user = rng.choice(users)
        if rng.random() < 0.9:
            return "/recommend", json.dumps({"user_id": user, "n": 10}).encode()
        ev = {"user_id": user, "item_id": rng.choice(items)}
        return "/interactions", json.dumps({"events": [ev]}).encode()

    return make


def bare_app_argv() -> list[str]:
    code = (
        "import uvicorn\nfrom fastapi import FastAPI\napp = FastAPI()\n"
        "@app.post('/recommend')\nasync def r() -> dict[str, int]:\n    return {'ok': 1}\n"
        "@app.get('/livez')\nasync def z() -> dict[str, int]:\n    return {'ok': 1}\n"
        "uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False)\n"
    )
    return [sys.executable, "-c", code]


def serve_argv(model: Path, redis_url: str) -> list[str]:
    return [sys.executable, "-m", "model.cli", "serve", "--model", str(model), "--port", "{port}",
            "--redis-url", redis_url]  # fmt: skip


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


# -------------------------------------------------------------------------------------- in process


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
    users, _ = _vocab(model)
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
    return {"concurrency": concurrency, "rps": len(lat) / elapsed, **_percentiles(lat)}


async def freshness(model: Path, port: int, trials: int, seed: int = 2) -> dict[str, Any]:
    """/interactions answer → first /recommend answer whose memories include the new one."""
    _, items = _vocab(model)
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
    return {"trials": trials, "not_seen": misses, **_percentiles(out)}


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
    _flush(BENCH_REDIS_URL)
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
        result["floor_bare_fastapi"] = {"steps": bare, "max_rps_p99_50ms": max_rate(bare, 50.0)}
    result["floor_pipeline"] = run_fast(pipeline_floor(model, BENCH_REDIS_URL, 4000, 32, args.nprobe))
    _flush(BENCH_REDIS_URL)
    return result


# ------------------------------------------------------------------------------------------ drift


def time_split(inter: Path, quantile: float, out_dir: Path) -> tuple[Path, list[tuple[str, str, float]]]:
    """Sequences of the interactions before the cut (a training file), and the later events in order."""
    rows: list[tuple[str, str, float]] = []
    with inter.open(encoding="utf-8") as f:
        next(f)
        for line in f:
            u, i, _, ts = line.rstrip("\n").split("\t")
            rows.append((u, i, float(ts)))
    rows.sort(key=lambda r: r[2])
    cut = rows[int(len(rows) * quantile)][2]
    seqs: dict[str, list[str]] = {}
    for u, i, t in rows:
        if t < cut:
            seqs.setdefault(u, []).append(i)
    known_items = {i for s in seqs.values() for i in s}
    later = [r for r in rows if r[2] >= cut and r[1] in known_items]
    path = out_dir / "early.txt"
    path.write_text("".join(f"{u} {' '.join(s)}\n" for u, s in seqs.items() if len(s) >= 3), encoding="utf-8")
    return path, later


async def replay(model: Path, later: list[tuple[str, str, float]], frozen: bool, ns: str) -> dict[str, Any]:
    """Ask /recommend before each later event, then post it. Per event: ``hit`` (the target in the top
    10) and ``gain`` (its NDCG@10), kept for the paired comparison and left out of the report."""
    import httpx

    from service.app import create_app
    from service.settings import Settings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    settings = Settings(model_dir=model, redis_url=DRIFT_REDIS_URL, namespace=ns, frozen_memory=frozen)
    app = create_app(settings)
    hit, gain = np.zeros(len(later)), np.zeros(len(later))
    candidates: Candidates = []
    used = fresh = 0
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for e, (u, i, t) in enumerate(later):
                req = {"user_id": u, "n": MIX_DEPTH, "explain": True}
                body = (await client.post("/recommend", json=req)).json()
                top = body["items"]  # the top 10 score the model; all of them feed the transition mix
                candidates.append(([it["item_id"] for it in top], np.array([it["score"] for it in top])))
                ranked = candidates[-1][0][:10]
                used += len(body.get("memories", []))
                fresh += sum(m["timestamp"] > 0 for m in body.get("memories", []))  # bank memories: ts 0
                if i in ranked:
                    hit[e], gain[e] = 1.0, 1.0 / math.log2(ranked.index(i) + 2)
                ev = {"user_id": u, "item_id": i, "timestamp": t}
                r = await client.post("/interactions", json={"events": [ev]})
                r.raise_for_status()
            stats = await app.state.runtime.store.stats()
    return {
        "events": len(later),
        "hr@10": float(hit.mean()),
        "ndcg@10": float(gain.mean()),
        "memories_after": stats.memories,
        "memories_used": used,
        "replayed_memories_used": fresh,
        "hit": hit,
        "gain": gain,
        "candidates": candidates,
    }


def paired(
    live: np.ndarray, frozen: np.ndarray, users: list[str], rounds: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Live minus frozen over the same events (n,) of ``users`` (n,): the mean, a 95 % bootstrap interval
    that resamples users with replacement (a user's events move together: they share a history and are
    not independent), the mean over each quarter of the replay in time order (live memories
    accumulate), and how many events score differently at all."""
    d = live - frozen
    ids = np.unique(np.asarray(users, dtype=object), return_inverse=True)[1]  # (n,) user index
    per_user, count = np.bincount(ids, weights=d), np.bincount(ids).astype(float)  # (U,), (U,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(count), (rounds, len(count)))  # (rounds, U) resampled users
    means = per_user[draws].sum(1) / count[draws].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "mean": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "by_quarter": [float(q.mean()) for q in np.array_split(d, 4)],
        "events_changed": int((d != 0).sum()),
    }


def groups(early: Path, later: list[tuple[str, str, float]], rising: float = 1.5) -> dict[str, np.ndarray]:
    """Boolean event masks (n,): returning users (with a history before the cut) and new ones; targets
    whose share of the later events is at least ``rising`` times their share before the cut (the
    trend that only live memories can see) and the rest."""
    rows = [line.split() for line in early.read_text(encoding="utf-8").splitlines()]  # user, items…
    before = Counter(i for row in rows for i in row[1:])
    after = Counter(i for _, i, _ in later)
    n_before, n_after = sum(before.values()), len(later)
    returning = {row[0] for row in rows}
    ret = np.array([u in returning for u, _, _ in later])
    up = np.array([after[i] / n_after >= rising * before[i] / n_before for _, i, _ in later])
    return {"returning users": ret, "new users": ~ret, "rising items": up, "other items": ~up}


Candidates = list[tuple[list[str], np.ndarray]]  # per event: the model's top items (m,), scores (m,)
MIX_DEPTH = 200  # model candidates the transition mix re-ranks
MIX_WEIGHTS = (0.1, 0.2, 0.3, 0.5)


def _next_scores(follow: dict[str, dict[str, float]], recent: list[str]) -> dict[str, float]:
    """Items that followed the recent ones (oldest first), the k-th most recent counting 1/k."""
    scores: dict[str, float] = {}
    for k, prev in enumerate(reversed(recent), start=1):
        for j, c in follow.get(prev, {}).items():
            scores[j] = scores.get(j, 0.0) + c / k
    return scores


def _mix(
    candidate: tuple[list[str], np.ndarray],
    scores: dict[str, float],
    seen: set[str],
    weights: Sequence[float],
) -> dict[float, list[str]]:
    """The top 10 of the model's candidates under (1 − λ) · softmax + λ · transition share, per λ."""
    items, logits = candidate  # the model's ranking, seen items already masked: (m,), (m,)
    p_model = np.exp(logits - logits.max())
    p_model /= p_model.sum()  # (m,) renormalised over the candidates
    total = sum(c for j, c in scores.items() if j not in seen)
    p_next = np.array([0.0 if j in seen else scores.get(j, 0.0) for j in items]) / (total or 1.0)  # (m,)
    mixed = {w: (1.0 - w) * p_model + w * p_next for w in weights}
    return {w: [items[x] for x in np.argsort(-m, kind="stable")[:10]] for w, m in mixed.items()}


def transition_replay(
    early: Path,
    later: list[tuple[str, str, float]],
    live: bool,
    order: int = 5,
    candidates: Candidates | None = None,
    weights: Sequence[float] = (),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A model-free reference beside the model: rank items by how often they followed the user's last
    ``order`` items in the stored sequences (the k-th most recent item counts 1/k, and so does each
    transition it made), seen items masked. ``live`` adds each replayed event's transitions after its
    recommendation; frozen keeps the sequences before the cut. With the model's ``candidates``, also
    re-rank them by (1 − λ) · softmax(model scores) + λ · transition share, for each λ in ``weights``.
    Per entry (``reference``, ``mix λ``) and event (n,): hit and NDCG@10. It measures how much the later
    events tell a recommender that reads them, against what the model takes from its memory bank."""
    hist: dict[str, list[str]] = {}
    follow: dict[str, dict[str, float]] = {}  # item -> {next item: weight}

    def add(u: str, i: str) -> None:
        h = hist.setdefault(u, [])
        for k, prev in enumerate(reversed(h[-order:]), start=1):
            nxt = follow.setdefault(prev, {})
            nxt[i] = nxt.get(i, 0.0) + 1.0 / k
        h.append(i)

    for row in (line.split() for line in early.read_text(encoding="utf-8").splitlines()):
        for i in row[1:]:
            add(row[0], i)
    names = ["reference", *(f"mix {w:g}" for w in weights)] if candidates else ["reference"]
    out = {name: (np.zeros(len(later)), np.zeros(len(later))) for name in names}
    for e, (u, i, _) in enumerate(later):
        h = hist.setdefault(u, [])
        seen, scores = set(h), _next_scores(follow, h[-order:])
        best = sorted(scores, key=lambda j: -scores[j])  # stable: ties keep the order first scored
        rankings = {"reference": [j for j in best if j not in seen][:10]}
        if candidates and candidates[e][0]:
            rankings |= {f"mix {w:g}": r for w, r in _mix(candidates[e], scores, seen, weights).items()}
        for name, ranked in rankings.items():
            if i in ranked:
                out[name][0][e], out[name][1][e] = 1.0, 1.0 / math.log2(ranked.index(i) + 2)
        if live:
            add(u, i)
        else:
            h.append(i)  # histories move on in both; only live transitions enter the counts
    return out


def drift_section(vote: bool, cut: float, transitions: bool = False) -> str:
    """The report key of a drift run: ``drift``, ``drift_vote``, ``drift_vote_transitions``, and
    ``_cut80`` &c. away from the 90 % cut (the first runs', whose keys stay as they were)."""
    head = "drift" + ("_vote" if vote else "") + ("_transitions" if transitions else "")
    return head + ("" if cut == 0.9 else f"_cut{round(cut * 100)}")


def run_drift(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir or os.environ.get("MEMREC_DATA_DIR") or "../shared/data")
    work = ROOT / "artifacts" / "drift" / f"cut{round(args.cut * 100)}"
    work.mkdir(parents=True, exist_ok=True)
    early, later = time_split(data_dir / "ml-100k" / "ml-100k.inter", args.cut, work)
    model = work / ("model" + ("-vote" if args.vote else "") + ("-transitions" if args.transitions else ""))
    train = [sys.executable, "-m", "model.cli", "train", "--dataset", str(early), "--out", str(model),
             "--objective", "sasrec", "--scheme", "allpos", "--epochs", str(args.epochs), "--ft-epochs",
             str(args.ft_epochs), "--device", "cpu", "--threads", "1"]  # fmt: skip
    train.append("--vote" if args.vote else "--no-vote")
    train.append("--transitions" if args.transitions else "--no-transitions")
    if not (model / "config.json").is_file():
        subprocess.run(train, check=True, capture_output=True)
    later = later[: args.events] if args.events else later
    _flush(DRIFT_REDIS_URL)
    live = asyncio.run(replay(model, later, frozen=False, ns="drift-live"))
    frozen = asyncio.run(replay(model, later, frozen=True, ns="drift-frozen"))
    _flush(DRIFT_REDIS_URL)
    by_group = {
        name: {
            "events": int(m.sum()),
            "live": {"hr@10": float(live["hit"][m].mean()), "ndcg@10": float(live["gain"][m].mean())},
            "frozen": {"hr@10": float(frozen["hit"][m].mean()), "ndcg@10": float(frozen["gain"][m].mean())},
        }
        for name, m in groups(early, later).items()
        if m.any()
    }
    event_users = [u for u, _, _ in later]
    gains = {
        "hr@10": paired(live.pop("hit"), frozen.pop("hit"), event_users),
        "ndcg@10": paired(live.pop("gain"), frozen.pop("gain"), event_users),
    }
    arms = {
        name: transition_replay(early, later, name == "live", 5, arm.pop("candidates"), MIX_WEIGHTS)
        for name, arm in (("live", live), ("frozen", frozen))
    }
    transitions: dict[str, Any] = {"order": 5, "depth": MIX_DEPTH}
    for entry in arms["live"]:  # reference, mix 0.1, …
        (t_hit, t_gain), (f_hit, f_gain) = arms["live"][entry], arms["frozen"][entry]
        transitions[entry] = {
            "live": {"hr@10": float(t_hit.mean()), "ndcg@10": float(t_gain.mean())},
            "frozen": {"hr@10": float(f_hit.mean()), "ndcg@10": float(f_gain.mean())},
            "paired": {
                "hr@10": paired(t_hit, f_hit, event_users),
                "ndcg@10": paired(t_gain, f_gain, event_users),
            },
        }
    return {
        "dataset": "ml-100k",
        "cut_quantile": args.cut,
        "vote": model_card(model)["vote"],
        "transition_weight": model_card(model)["transition_weight"],
        "train_command": shlex.join(["memrec", *train[3:]]).replace(str(ROOT) + "/", ""),
        "live": live,
        "frozen": frozen,
        "hr@10_gain": live["hr@10"] - frozen["hr@10"],
        "ndcg@10_gain": live["ndcg@10"] - frozen["ndcg@10"],
        "paired": gains,
        "groups": by_group,
        "transitions": transitions,
    }


# ----------------------------------------------------------------------------------------- report


def write_reports(section: str, result: dict[str, Any], command: str) -> None:
    path = REPORTS / "service.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report.pop("machine", None)  # each section records its own: they are run on different days
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report[section] = {**result, "command": command, "date": when, "machine": machine_label(machine())}
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (REPORTS / "service.md").write_text(render_md(report), encoding="utf-8")


def _load_md(load: dict[str, Any]) -> list[str]:
    lines = [
        f"## Load (`{load['command']}`, {load['date']}, {load.get('machine', 'machine not recorded')})",
        "",
        f"Model: `{load['model']}` (`{load.get('model_version', '?')}`, {load.get('objective')}/"
        f"{load.get('scheme')} encoder, K = {load.get('k')}{_vote(load)}) with its full memory bank of "
        f"{load.get('bank_memories')} memories, Redis backend, {load['workers']} server "
        f"process(es), nprobe {load['nprobe']}{_batch_wait(load)}; open loop on loopback, "
        f"{_windows(load)}, 90 % /recommend + 10 % /interactions; latency counts from each request's "
        "scheduled time. 1-minute load average when the run started: "
        f"{load['load_average_at_start']:.1f} on 2 cores (other jobs share the machine).",
        "",
        "| rate (req/s) | achieved | p50 ms | p99 ms | p99 of each window ms | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in load["steps"]:
        cells = [f"{s['rate']:.0f}", f"{s['achieved_rps']:.0f}", f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}"]
        each = ", ".join(f"{w['p99_ms']:.1f}" for w in s.get("windows", [s]))
        lines.append("| " + " | ".join([*cells, each, str(s["errors"])]) + " |")
    bare, pipe, fresh = load["floor_bare_fastapi"], load["floor_pipeline"], load["freshness"]
    return [
        *lines,
        "",
        f"- `load.max_rps_p99_50ms` = **{load['max_rps_p99_50ms']:.0f}** req/s "
        f"(p99 ≤ 25 ms up to {load['max_rps_p99_25ms']:.0f} req/s).",
        f"- Floor, bare FastAPI endpoint under the same generator: p99 ≤ 50 ms up to "
        f"{bare['max_rps_p99_50ms']:.0f} req/s"
        + (" (the highest rate tried)." if bare["max_rps_p99_50ms"] >= max(load["rates"]) else "."),
        f"- Floor, in-process pipeline (no HTTP, {pipe['concurrency']} concurrent callers): "
        f"{pipe['rps']:.0f} req/s, p50 {pipe['p50_ms']:.1f} ms, p99 {pipe['p99_ms']:.1f} ms.",
        f"- Freshness (/interactions answer → memory retrieved): p50 {fresh['p50_ms']:.1f} ms, "
        f"p99 {fresh['p99_ms']:.1f} ms, {fresh['trials']} trials, {fresh['not_seen']} never seen.",
        *_jitter_md(load),
        "",
    ]


def _vote(load: dict[str, Any]) -> str:
    vote = load.get("vote") or {}
    out = ""
    if vote.get("weight"):
        out += f", memory vote λ {vote['weight']:g}, τ {vote['temperature']:g}, {vote['depth']} voters"
    if load.get("transition_weight"):
        out += f", transition channel λ {load['transition_weight']:g}"
    elif "transition_weight" in load:
        out += ", no transition channel"
    return out


def _windows(load: dict[str, Any]) -> str:
    repeats = load.get("repeats", 1)  # runs before repeated windows: one window per rate
    if repeats == 1:
        return f"{load['duration_s']:.0f} s per rate"
    return f"{repeats} windows of {load['duration_s']:.0f} s per rate (p50, p99: their medians)"


def _batch_wait(load: dict[str, Any]) -> str:
    wait = load.get("batch_max_wait_ms")
    return "" if wait is None else f", micro-batch wait {wait:g} ms"


def _jitter_md(load: dict[str, Any]) -> list[str]:
    if "cpu_jitter" not in load:  # runs before the jitter probe existed
        return []
    j = load["cpu_jitter"]
    return [
        "- Host CPU jitter before the run: identical ~1.5 ms chunks of Python work took "
        f"p50 {j['p50_ms']:.1f} ms, p99 {j['p99_ms']:.1f} ms, max {j['max_ms']:.1f} ms "
        "(the host's scheduling noise, which every "
        "tail latency above includes)."
    ]


def _arms_cells(r: dict[str, Any]) -> list[str]:
    """HR@10 and NDCG@10 of the live and frozen arms, then the paired HR@10 gain with its interval."""
    d = r["paired"]["hr@10"]
    cells = [f"{r[a][m]:.4f}" for m in ("hr@10", "ndcg@10") for a in ("live", "frozen")]
    return [*cells, f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"]


def _drift_md(drift: dict[str, Any], title: str) -> list[str]:
    vote = drift.get("vote", {})
    voting = (
        f"The memory vote, chosen on validation: weight {vote['weight']:g}, temperature "
        f"{vote['temperature']:g}, {vote['depth']} voters."
        if vote.get("weight")
        else "Validation refused the memory vote, so it is off."
        if "--vote" in drift["command"].split()
        else "The memory vote is off."
    )
    if drift.get("transition_weight"):
        voting += f" The transition channel, chosen on validation: λ {drift['transition_weight']:g}."
    elif "--transitions" in drift["command"].split():
        voting += " Validation refused the transition channel, so it is off."
    lines = [
        f"## {title} (`{drift['command']}`, {drift['date']}, {drift.get('machine', 'machine not recorded')})",
        "",
        f"ml-100k split by time at the {drift['cut_quantile']:.0%} quantile; model trained on the earlier "
        f"part (`{drift['train_command']}`); the first {drift['live']['events']} later interactions "
        "replayed in time order, each preceded by /recommend (n = 10, seen items masked). " + voting,
        "",
        "| memory bank | HR@10 | NDCG@10 | memories at the end | fused memories | of them replayed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("live", "frozen"):
        d = drift[name]
        cells = [f"{d['hr@10']:.4f}", f"{d['ndcg@10']:.4f}", str(d["memories_after"])]
        cells += [str(d.get("memories_used", "")), str(d.get("replayed_memories_used", ""))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gain = f"HR@10 {drift['hr@10_gain']:+.4f}, NDCG@10 {drift['ndcg@10_gain']:+.5f}"
    lines += ["", f"Live minus frozen: {gain}."]
    if "paired" in drift:  # runs before the paired comparison existed have the means only
        p = drift["paired"]
        lines[-1] += (
            " Paired over the same events, 95 % bootstrap intervals: HR@10 "
            f"[{p['hr@10']['ci95'][0]:+.4f}, {p['hr@10']['ci95'][1]:+.4f}], NDCG@10 "
            f"[{p['ndcg@10']['ci95'][0]:+.5f}, {p['ndcg@10']['ci95'][1]:+.5f}]; the live bank changed "
            f"the top 10's hit on {p['hr@10']['events_changed']} events and the NDCG on "
            f"{p['ndcg@10']['events_changed']}."
        )
        quarters = ", ".join(f"{q:+.4f}" for q in p["hr@10"]["by_quarter"])
        lines[-1] += f" Live minus frozen by quarter of the replay: HR@10 {quarters}."
    if "groups" in drift:
        lines += [
            "",
            "By event (rising items: a share of the replayed events at least 1.5 times their share "
            "before the cut):",
            "",
            "| events | n | HR@10 live | HR@10 frozen | NDCG@10 live | NDCG@10 frozen |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, g in drift["groups"].items():
            cells = [str(g["events"]), f"{g['live']['hr@10']:.4f}", f"{g['frozen']['hr@10']:.4f}"]
            cells += [f"{g['live']['ndcg@10']:.4f}", f"{g['frozen']['ndcg@10']:.4f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "transitions" in drift:
        t = drift["transitions"]
        lines += [
            "",
            f"Model-free reference over the same events (items that followed the user's last {t['order']} "
            "items in the stored sequences, no model), and the model's top "
            f"{t.get('depth', '–')} re-ranked by (1 − λ) · its softmax + λ · that transition share, each "
            "with its own arm's counts (λ picked here on the replay itself, so a bound on what a tuned mix "
            "would keep):",
            "",
            "| ranking | HR@10 live | HR@10 frozen | NDCG@10 live | NDCG@10 frozen | live − frozen HR@10 |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for entry, r in t.items():
            if isinstance(r, dict):
                lines.append(f"| {entry} | " + " | ".join(_arms_cells(r)) + " |")
    return [*lines, ""]


def render_md(report: dict[str, Any]) -> str:
    lines = ["# Service benchmarks", ""]
    for key in sorted(k for k in report if k.startswith("load")):  # load, load_fine, ...: more sweeps
        if key in report:
            lines += _load_md(report[key])
    drifts = sorted(
        (k for k in report if k.startswith("drift")), key=lambda k: (-report[k]["cut_quantile"], k)
    )
    for key in drifts:
        title = (
            "Drift replay"
            + (", memory vote" if "_vote" in key else "")
            + (", transition channel" if "_transitions" in key else "")
            + f", {report[key]['cut_quantile']:.0%} cut"
        )
        lines += _drift_md(report[key], title)
    return "\n".join(lines)


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
    lp.add_argument("--batch-wait-ms", type=float, default=1.0, help="the server's micro-batch wait")
    lp.add_argument("--section", default="load", help="report key (e.g. a second model's sweep)")
    dp = sub.add_parser("drift", help="time-split replay, live versus frozen memory")
    dp.add_argument("--data-dir")
    dp.add_argument("--cut", type=float, default=0.9)
    dp.add_argument("--events", type=int, help="replay only the first N later events (default: all)")
    dp.add_argument("--epochs", type=int, default=20)
    dp.add_argument("--ft-epochs", type=int, default=5)
    dp.add_argument("--vote", action="store_true", help="tune the memory vote (report section drift_vote)")
    dp.add_argument(
        "--transitions", action="store_true", help="tune the transition channel (section drift_*transitions)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "bench.service", *(argv if argv is not None else sys.argv[1:])])
    runner: Callable[[argparse.Namespace], dict[str, Any]] = run_load if args.command == "load" else run_drift
    section = args.section if args.command == "load" else args.command
    if args.command == "drift":
        section = drift_section(args.vote, args.cut, args.transitions)
    write_reports(section, runner(args), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
