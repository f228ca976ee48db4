"""Hot model swap under load: how long a server takes to move to a new model version, and what the
requests meanwhile see (``python -m bench.service swap``; a section of ``reports/service.*``).

The server (Redis, ``--workers`` processes, each watching the model link every second) serves ``MODEL``
through a link; open-loop mixed traffic runs throughout; after ``--before`` seconds the link is switched
to a second version. The second version is a copy of ``MODEL`` under another model version (the same
weights: what a move costs does not depend on them). With ``--reindexed`` its memory bank is loaded into
its namespace before the load starts, as the retrain loop's ``reindex`` step does; without, the move
loads it (a version nobody reindexed).

Reported: seconds from the link switch to the first answer of the new version and to the last answer
of the old one (every worker moved), p50 / p99 before, during and after the move, errors, and whether
every acknowledged interaction is in the new version's interaction log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import Connection, mixed_traffic, percentiles, run_fast
from bench.serving import flush, launch, model_card, serve_argv
from model import artifact

log = logging.getLogger(__name__)

Answer = tuple[float, float, int, str, str | None]  # (scheduled at, seconds, status, path, model version)


def second_version(model: Path) -> Path:
    """A copy of ``model`` under another model version (made once, beside it)."""
    out = model.with_name(model.name + "-swap")
    if not (out / "config.json").is_file():
        shutil.copytree(model, out, dirs_exist_ok=True)
        config = json.loads((out / "config.json").read_text())
        config["model_version"] = config["model_version"] + "-swap"
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def point(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".next")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve())
    tmp.replace(link)  # atomic, as the retrain loop publishes


async def traffic(port: int, rate: float, duration_s: float, model: Path, at_switch: float, link: Path,
                  target: Path, conns: int = 128) -> tuple[list[Answer], float, int]:  # fmt: skip
    """Open-loop traffic; the link switches ``at_switch`` seconds in. Returns every answer, the switch
    time and how many interactions were accepted."""
    make = mixed_traffic(model)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await Connection.open("127.0.0.1", port))
    clock = time.perf_counter
    answers: list[Answer] = []
    accepted = 0

    async def one(at: float, path: str, body: bytes) -> None:
        nonlocal accepted
        conn = await pool.get()
        try:
            status, raw = await conn.post(path, body)
        finally:
            pool.put_nowait(conn)
        version = None
        if status == 200:
            out = json.loads(raw)
            version = out.get("model_version")
            accepted += out.get("accepted", 0)
        answers.append((at, clock() - at, status, path, version))

    start = clock() + 0.05
    switch_at = start + at_switch
    switched = False
    tasks = []
    for i in range(int(rate * duration_s)):
        at = start + i / rate
        if not switched and at >= switch_at:
            point(link, target)
            switch_at, switched = clock(), True
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at, *make(i))))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().close()
    return answers, switch_at, accepted


def logged_rows(redis_url: str, namespace: str) -> int:
    import redis

    return int(redis.Redis.from_url(redis_url).xlen(f"memrec:{{{namespace}}}:interactions"))


def summarise(answers: list[Answer], switch_at: float, old: str, new: str) -> dict[str, Any]:
    """When the versions changed over, and the latency in each phase."""
    first_new = min((at for at, _, _, _, v in answers if v == new), default=float("nan"))
    last_old = max((at for at, _, _, _, v in answers if v == old), default=float("nan"))
    phases = {
        "before": [s for at, s, *_ in answers if at < switch_at],
        "during": [s for at, s, *_ in answers if switch_at <= at <= last_old],
        "after": [s for at, s, *_ in answers if at > last_old],
    }
    statuses: dict[str, int] = {}
    for _, _, status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "first_new_answer_s": first_new - switch_at,
        "last_old_answer_s": last_old - switch_at,
        "phases": {name: percentiles(xs) for name, xs in phases.items()},
        "statuses": statuses,
        "errors": sum(n for s, n in statuses.items() if int(s) >= 500),
        "mixed_versions": sorted({v for *_, v in answers if v is not None}),
    }


def reindex(model: Path, redis_url: str, store_dir: Path) -> float:
    """``memrec reindex`` of ``model`` (its bank into its namespace, as the retrain loop does before it
    publishes a version); the seconds it took."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "service.cli", "reindex", "--model", str(model), "--redis-url", redis_url]
    subprocess.run([*cmd, "--store-dir", str(store_dir)], check=True, capture_output=True)
    return time.perf_counter() - t0


def run_swap(model: Path, redis_url: str, rate: float, before_s: float, after_s: float, workers: int,
             threads: int, reindexed: bool) -> dict[str, Any]:  # fmt: skip
    """One move under load; the figures of :func:`summarise`, with what the run was. ``reindexed``: the
    new version's bank is loaded into its namespace beforehand (by a separate process, as the retrain
    loop's ``reindex`` step does), so the move only reads it."""
    target = second_version(model)
    old, new = artifact.model_version(model), artifact.model_version(target)
    flush(redis_url)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as out:
        reindex_s = reindex(target, redis_url, Path(tmp) / "reindex") if reindexed else None
        link = Path(tmp) / "current"
        point(link, model)
        env = {
            "MEMREC_WORKERS": str(workers),
            "MEMREC_TORCH_THREADS": str(threads),
            "MEMREC_MODEL_WATCH_S": "1",
            "MEMREC_SWAP_GRACE_S": "10",
            "MEMREC_STORE_DIR": str(Path(tmp) / "store"),
            "MEMREC_LOG_LEVEL": "warning",
        }
        t0 = time.perf_counter()
        proc, port = launch(serve_argv(link, redis_url), env, "/readyz", out)
        started = time.perf_counter() - t0
        try:
            answers, switch_at, accepted = run_fast(
                traffic(port, rate, before_s + after_s, model, before_s, link, target)
            )
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    result = summarise(answers, switch_at, old, new)
    in_new = logged_rows(redis_url, new)
    return {
        "model": str(model),
        **model_card(model),
        "second_version": new,
        "rate": rate,
        "before_s": before_s,
        "after_s": after_s,
        "workers": workers,
        "threads": threads,
        "startup_s": started,
        "load_average_at_start": os.getloadavg()[0],
        "accepted_interactions": accepted,
        "logged_in_new_version": in_new,
        "none_lost": in_new == accepted,
        "reindexed": reindexed,
        "reindex_s": reindex_s,
        "latency_ms_all": float(np.percentile([s for _, s, *_ in answers], 99) * 1000),
        **result,
    }


def swap_md(key: str, run: dict[str, Any]) -> list[str]:
    p = run["phases"]
    rows = [
        f"| {name} | {p[name]['n']} | {p[name]['p50_ms']:.1f} | {p[name]['p99_ms']:.1f} |"
        for name in ("before", "during", "after")
    ]
    machine = run.get("machine", "machine not recorded")
    lost = "none lost" if run["none_lost"] else "MISMATCH"
    prepared = (
        "whose memory bank `memrec reindex` had loaded into its namespace beforehand "
        f"({run['reindex_s']:.0f} s, as the retrain loop does before it publishes)"
        if run.get("reindexed")
        else "whose namespace starts empty: the move itself loads the whole memory bank into it"
    )
    return [
        f"## Hot model swap (`{run['command']}`, {run['date']}, {machine})",
        "",
        f"`{run['model']}` ({run.get('bank_memories')} memories) served through a link by "
        f"{run['workers']} worker(s) on Redis, each checking the link every second; {run['rate']:.0f} "
        "req/s of open-loop mixed traffic (90 % /recommend, 10 % /interactions); after "
        f"{run['before_s']:.0f} s the link moves to `{run['second_version']}` (the same weights under "
        f"another version), {prepared}. "
        f"1-minute load average at the start: {run['load_average_at_start']:.1f} on 2 cores.",
        "",
        f"- first answer of the new version {run['first_new_answer_s']:.1f} s after the switch, last "
        f"answer of the old one {run['last_old_answer_s']:.1f} s after it (every worker moved);",
        f"- answers by status {run['statuses']}; server errors (5xx): {run['errors']};",
        f"- interactions acknowledged {run['accepted_interactions']}, in the new version's log "
        f"{run['logged_in_new_version']} ({lost}).",
        "",
        "| phase | answers | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]
