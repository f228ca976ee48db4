"""Hot model swap (service.swap): a replica follows its model path to a new model version without
downtime: the new version loads beside the old, catches up on the interaction log, then answers every
request; writes during the move reach both, none is lost; a failed move leaves the old version serving."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import free_port
from test_service_support import (  # noqa: F401  (fixtures)
    metric,
    model_dir,
    running_app,
    service_redis,
    start_server,
    toy_root,
    train_toy_model,
    wait_ready,
)

from model import artifact

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def next_model(toy_root: Path) -> Path:  # noqa: F811
    """The model a retrain publishes: another encoder seed, another model version."""
    return train_toy_model(toy_root, "model-seed2", "--seed", "2")


def link(path: Path, target: Path) -> Path:
    """Point the link ``path`` at ``target`` atomically (as the retrain job publishes a model)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve())
    tmp.replace(path)
    return path


def events(user: str, items: list[str], with_ids: bool = True, t0: float = 1_000.0) -> dict[str, Any]:
    """One event per item at t0, t0 + 1, …; ids (unique per user and time) unless ``with_ids`` is off."""
    rows = [{"user_id": user, "item_id": item, "timestamp": t0 + n} for n, item in enumerate(items)]
    if with_ids:
        rows = [{**row, "event_id": f"{user}-{row['timestamp']}"} for row in rows]
    return {"events": rows}


async def history(client: httpx.AsyncClient, user: str) -> list[str]:
    r = await client.get(f"/users/{user}/history", params={"n": 100})
    return [it["item_id"] for it in reversed(r.json()["items"])]


async def test_reload_moves_to_the_linked_model_with_every_interaction(
    model_dir: Path,  # noqa: F811
    next_model: Path,
    tmp_path: Path,
) -> None:
    current = link(tmp_path / "current", model_dir)
    settings = {"model_dir": current, "store_dir": tmp_path / "s", "model_watch_s": 0, "swap_grace_s": 0}
    async with running_app(**settings) as (app, client):
        old = app.state.runtime
        assert (await client.post("/admin/reload")).json()["outcome"] == "current"
        posted = [events("w1", ["i1", "i2", "sku-new"]), events("w2", ["i5", "i6"], with_ids=False)]
        for body in posted:
            assert (await client.post("/interactions", json=body)).json()["accepted"] == len(body["events"])

        link(current, next_model)
        r = (await client.post("/admin/reload")).json()
        want = artifact.model_version(next_model)
        assert (
            r["outcome"] == "switched" and r["to_version"] == want and r["from_version"] == old.model_version
        )
        assert r["replayed"] == 5  # every logged interaction, none of the bank's rows
        assert app.state.runtime.model_version == want and app.state.versions.warming == ()
        assert (await client.get("/readyz")).json()["model_version"] == want
        # the new version holds every interaction, in order, the new item included
        assert await history(client, "w1") == ["i1", "i2", "sku-new"]
        assert await history(client, "w2") == ["i5", "i6"]
        answer = (await client.post("/recommend", json={"user_id": "w1"})).json()
        assert answer["model_version"] == want and answer["items"]
        # known users' bank histories and states are there too
        (stored,) = await app.state.runtime.store.histories(["u0"], 200)
        assert len(stored) > 0
        # the old version retires after the grace period (0 here): its micro-batcher stops
        for _ in range(200):
            if not old.pipeline.running:
                break
            await asyncio.sleep(0.01)
        assert not old.pipeline.running
        text = (await client.get("/metrics")).text
        assert metric(text, 'memrec_model_swaps_total{outcome="switched"}') == 1
        assert metric(text, f'memrec_model_version_info{{version="{want}"}}') == 1
        assert metric(text, f'memrec_model_version_info{{version="{old.model_version}"}}') == 0
        assert (await client.post("/admin/reload")).json()["outcome"] == "current"


async def test_the_catch_up_skips_what_the_model_was_trained_on(
    model_dir: Path,  # noqa: F811
    next_model: Path,
    tmp_path: Path,
) -> None:
    """A model trained on an export knows the interactions up to its data's last timestamp: only the
    later ones are replayed into it, and each user's latest before it (held out of the memory bank as
    the test target, it must end their history again)."""
    trained = tmp_path / "trained-through"
    shutil.copytree(next_model, trained)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "data_until": 1_001.5}))
    current = link(tmp_path / "current", model_dir)
    settings = {"model_dir": current, "store_dir": tmp_path / "s", "model_watch_s": 0, "swap_grace_s": 0}
    async with running_app(**settings) as (app, client):
        await client.post("/interactions", json=events("t", ["i1", "i2", "i3", "i4"]))  # at 1000 .. 1003
        link(current, trained)
        r = (await client.post("/admin/reload")).json()
        assert r["outcome"] == "switched" and r["replayed"] == 3
        assert await history(client, "t") == ["i2", "i3", "i4"]
        # the held-out row is in the training data the next export merges: logged once, there
        logged = await app.state.runtime.store.interactions()
        assert list(logged.timestamps) == [1002.0, 1003.0]


async def test_a_failed_move_leaves_the_old_version_serving(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    current = link(tmp_path / "current", model_dir)
    settings = {"model_dir": current, "store_dir": tmp_path / "s", "model_watch_s": 0, "swap_grace_s": 0}
    async with running_app(**settings) as (app, client):
        version = app.state.runtime.model_version
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({"model_version": "toy-broken"}))
        link(current, broken)
        r = (await client.post("/admin/reload")).json()
        assert r["outcome"] == "failed" and r["error"]
        assert app.state.runtime.model_version == version and app.state.versions.warming == ()
        assert (await client.post("/recommend", json={"user_id": "u1"})).json()["model_version"] == version
        body = events("f", ["i1"])
        assert (await client.post("/interactions", json=body)).json()["accepted"] == 1
        text = (await client.get("/metrics")).text
        assert metric(text, 'memrec_model_swaps_total{outcome="failed"}') == 1


async def test_a_fixed_namespace_refuses_the_move(
    model_dir: Path,  # noqa: F811
    next_model: Path,
    tmp_path: Path,
) -> None:
    current = link(tmp_path / "current", model_dir)
    settings = {"model_dir": current, "store_dir": tmp_path / "s", "model_watch_s": 0, "namespace": "shop"}
    async with running_app(**settings) as (app, client):
        # two versions must never share memories: a move needs a namespace per version
        link(current, next_model)
        r = (await client.post("/admin/reload")).json()
        assert r["outcome"] == "failed" and "MEMREC_NAMESPACE" in r["error"]
        assert app.state.runtime.model_version == artifact.model_version(model_dir)


class Load:
    """Open-loop mixed traffic (9 recommendations to 1 interaction batch) from a thread, every answer
    recorded: status, model version, latency."""

    def __init__(self, bases: list[str], rate: float) -> None:
        self.bases, self.period = bases, 1.0 / rate
        self.answers: list[tuple[float, int, str | None, float]] = []  # (sent at, status, version, seconds)
        self.acknowledged: dict[str, list[str]] = {}  # user → items, in order
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            n = 0
            next_at = time.perf_counter()
            while not self.stop.is_set():
                base = self.bases[n % len(self.bases)]
                user = f"load{n % 7}"
                t0 = time.perf_counter()
                if n % 10 == 9:
                    item = f"i{n % 40}"
                    r = client.post(
                        f"{base}/interactions", json=events(user, [item], with_ids=n % 20 != 19, t0=n)
                    )
                    if r.status_code == 200:
                        self.acknowledged.setdefault(user, []).append(item)
                    version = None
                else:
                    r = client.post(f"{base}/recommend", json={"user_id": user})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                self.answers.append((t0, r.status_code, version, time.perf_counter() - t0))
                n += 1
                next_at += self.period
                time.sleep(max(0.0, next_at - time.perf_counter()))


def test_two_replicas_move_under_load_without_losing_anything(
    model_dir: Path,  # noqa: F811
    next_model: Path,
    service_redis: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    current = link(tmp_path / "current", model_dir)
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    env = {"model_watch_s": "0.5", "swap_grace_s": "2"}
    procs = [start_server(current, service_redis, p, tmp_path / f"r{p}.log", **env) for p in ports]
    try:
        for base, proc, p in zip(bases, procs, ports, strict=True):
            wait_ready(base, proc, tmp_path / f"r{p}.log")
        old, new = artifact.model_version(model_dir), artifact.model_version(next_model)
        load = Load(bases, rate=40.0)
        load.thread.start()
        time.sleep(2.0)
        switch_at = time.perf_counter()
        link(current, next_model)  # both replicas watch the link
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(httpx.get(f"{b}/readyz").json()["model_version"] == new for b in bases):
                break
            time.sleep(0.1)
        converged = time.perf_counter() - switch_at
        time.sleep(2.0)
        load.stop.set()
        load.thread.join(10)

        statuses = [status for _, status, _, _ in load.answers]
        assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
        versions = [v for _, _, v, _ in load.answers if v is not None]
        assert set(versions) == {old, new}
        assert all(v == new for t, _, v, _ in load.answers if v is not None and t > switch_at + converged)
        # every acknowledged interaction is in the new version, in order, on both replicas
        for base in bases:
            for user, items in load.acknowledged.items():
                r = httpx.get(f"{base}/users/{user}/history", params={"n": 1000})
                stored = [it["item_id"] for it in reversed(r.json()["items"])]
                assert stored[-len(items) :] == items, user
        # the last replica to retire the old version deleted its namespace
        client = redis.Redis.from_url(service_redis)
        deadline = time.monotonic() + 30
        while client.keys(f"memrec:{{{old}}}:*") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.keys(f"memrec:{{{old}}}:*") == []
        during = [s for t, _, _, s in load.answers if switch_at <= t <= switch_at + converged]
        p99 = statistics.quantiles(during, n=100)[98] if len(during) >= 2 else float("nan")
        log.info(
            "converged in %.2f s; p99 during the move %.1f ms (%d answers)",
            converged,
            1000 * p99,
            len(during),
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)


async def test_the_old_namespace_is_dropped_and_a_move_back_rebuilds_it(
    model_dir: Path,  # noqa: F811
    next_model: Path,
    tmp_path: Path,
) -> None:
    """Once retired, the old version's namespace is deleted (nothing of it, erased users included,
    outlives the move); moving back loads its bank again and replays the log into it."""
    current = link(tmp_path / "current", model_dir)
    settings = {"model_dir": current, "store_dir": tmp_path / "s", "model_watch_s": 0, "swap_grace_s": 0}
    async with running_app(**settings) as (app, client):
        old = app.state.runtime
        old_dir = tmp_path / "s" / old.store.config.namespace
        await client.post("/interactions", json=events("b", ["i1", "i2"]))
        link(current, next_model)
        assert (await client.post("/admin/reload")).json()["outcome"] == "switched"
        for _ in range(200):
            if not old_dir.exists():
                break
            await asyncio.sleep(0.01)
        assert not old_dir.exists()
        link(current, model_dir)
        r = (await client.post("/admin/reload")).json()
        assert r["outcome"] == "switched" and r["to_version"] == old.model_version
        assert await history(client, "b") == ["i1", "i2"]  # once, not twice
        (stored,) = await app.state.runtime.store.histories(["u0"], 200)
        assert stored  # the bank is back
