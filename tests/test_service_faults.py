"""Faults with real processes: Redis killed (SIGKILL) under a stream of writes and restarted from its
append-only file, the API killed and restarted, a replica that falls behind, corrupt model and snapshot
files. Each test asserts that nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import RedisServer, free_port
from test_service_support import (  # noqa: F401  (fixtures)
    N_ITEMS,
    metric,
    model_dir,
    running_app,
    service_redis,
    start_server,
    toy_root,
    wait_ready,
)

from memory_store import StoreConfig, open_store
from model import artifact
from service.settings import Settings


def batch(i: int) -> dict[str, Any]:
    """One new user with three items: the first starts the history, the next two add a memory each."""
    return {
        "events": [
            {"user_id": f"f{i}", "item_id": f"i{(i + j) % N_ITEMS}", "event_id": f"f{i}-{j}"}
            for j in range(3)
        ]
    }


def user_batch(user: str, i: int) -> dict[str, Any]:
    """``batch(i)`` for a chosen user id."""
    return {"events": [ev | {"user_id": user} for ev in batch(i)["events"]]}


async def stored_histories(model: Path, redis_url: str, users: list[str]) -> list[list[int]]:
    """Read histories straight from the store (the namespace the service uses for this model)."""
    art = artifact.load(model, "cpu")
    namespace = Settings(model_dir=model).store_namespace(art.model_version)
    store = await open_store(StoreConfig(dim=art.encoder.cfg.dim, namespace=namespace, redis_url=redis_url))
    try:
        return await store.histories(users, 10)
    finally:
        await store.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., tuple[str, subprocess.Popen[bytes], Path]]]:
    """``server(model, redis_url, **settings)`` starts ``memrec serve``; every one is stopped after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        model: Path, redis_url: str | None, log: str = "api", **env: str
    ) -> tuple[str, subprocess.Popen[bytes], Path]:
        port = free_port()
        log_path = tmp_path / f"{log}.log"
        proc = start_server(model, redis_url, port, log_path, **env)
        procs.append(proc)
        return f"http://127.0.0.1:{port}", proc, log_path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class Writer:
    """A client streaming interactions, one batch after another, in a thread; records every outcome.
    An exception in the thread ends it and is kept: :meth:`wait_for` and :meth:`stop` raise it in
    the test, instead of the test waiting on a writer that died."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.acked: list[int] = []
        self.refused: list[int] = []
        self.statuses: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)  # never holds up the exit
        self._thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.base, timeout=10) as c:
                i = 0
                while not self._stop.is_set():
                    r = c.post("/interactions", json=batch(i))
                    self.statuses.append(r.status_code)
                    if r.status_code == 200 and r.json() == {"accepted": 3, "duplicates": 0}:
                        self.acked.append(i)
                    elif r.status_code == 503 and "memory store unavailable" in r.json()["detail"]:
                        self.refused.append(i)
                    i += 1
        except BaseException as exc:  # handed to the test thread, where it fails the test
            self.error = exc

    def _raise_error(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the writer thread failed: {self.error!r}") from self.error

    def wait_for(self, done: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Poll ``done`` until it holds; fail after ``timeout_s`` or as soon as the writer has died."""
        deadline = time.monotonic() + timeout_s
        while not done():
            self._raise_error()
            if not self._thread.is_alive():
                raise AssertionError(f"the writer thread stopped before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {what} within {timeout_s} s (statuses {sorted(set(self.statuses))})"
                )
            time.sleep(0.01)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop and join the thread (within ``timeout_s``: one request has a 10 s timeout); raise what
        it raised."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        assert not self._thread.is_alive(), f"the writer thread did not stop within {timeout_s} s"
        self._raise_error()


def test_a_dead_writer_fails_the_wait_at_once() -> None:
    # Nothing listens on the port: the writer's first request raises in its thread. The test must
    # see that error within moments, not sit out the wait's deadline (or the pytest timeout).
    w = Writer(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="the writer thread failed: ConnectError"):
        w.wait_for(lambda: len(w.acked) >= 1, "an acknowledged batch", timeout_s=60)
    assert time.monotonic() - t0 < 10
    with pytest.raises(AssertionError, match="the writer thread failed: ConnectError"):
        w.stop()


def test_redis_killed_under_writes_loses_nothing_acknowledged(
    model_dir: Path,  # noqa: F811
    redis_server: Callable[..., RedisServer],
    server: Callable[..., tuple[str, subprocess.Popen[bytes], Path]],
) -> None:
    redis = redis_server("--appendonly", "yes", "--appendfsync", "everysec")
    base, proc, log = server(model_dir, redis.url)
    wait_ready(base, proc, log)
    client = httpx.Client(base_url=base, timeout=10)
    bank = metric(client.get("/metrics").text, "memrec_memory_bank_size")

    w = Writer(base)
    acked, refused = w.acked, w.refused
    try:
        w.wait_for(lambda: len(acked) >= 30, "30 acknowledged batches", timeout_s=60)
        redis.kill()  # SIGKILL mid-stream: no shutdown save, only the append-only file survives
        w.wait_for(lambda: len(refused) >= 10, "10 refusals with Redis down", timeout_s=60)
        # While Redis is down: readiness is false, recommendations degrade instead of failing.
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.json()["checks"]["store"].startswith("unavailable")
        r = client.post("/recommend", json={"user_id": "f1", "history": ["i7", "i8"], "n": 5})
        assert r.status_code == 200 and r.json()["degraded"] is True and r.json()["strategy"] == "retrieval"
        assert len(r.json()["items"]) == 5 and {"i7", "i8"}.isdisjoint(
            it["item_id"] for it in r.json()["items"]
        )
        r = client.post("/recommend", json={"user_id": "f1", "n": 5})
        assert r.status_code == 200 and r.json()["degraded"] is True and r.json()["strategy"] == "popular"
        assert metric(client.get("/metrics").text, "memrec_degraded_total") >= 2

        redis.start()  # same folder: Redis replays its append-only file
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready again after Redis came back"
            time.sleep(0.1)
        n_before = len(acked)
        w.wait_for(lambda: len(acked) >= n_before + 20, "20 more acknowledged batches", timeout_s=60)
    finally:
        w.stop()  # raises the writer's own error, if it had one
    assert set(w.statuses) <= {200, 503}, sorted(set(w.statuses))  # never a 500
    assert len(acked) + len(refused) == len(w.statuses)  # every answer was a clean accept or refusal
    # The client retries what was refused, with the same event ids: each batch lands once.
    for i in refused:
        r = client.post("/interactions", json=batch(i))
        assert r.status_code == 200 and sum(r.json().values()) == 3
    total = len(acked) + len(refused)
    # Every acknowledged batch is in Redis after the kill: histories, dedup markers and memories.
    histories = asyncio.run(stored_histories(model_dir, redis.url, [f"f{i}" for i in acked]))
    vocab = artifact.load(model_dir, "cpu").vocab
    for i, hist in zip(acked, histories, strict=True):
        assert [vocab.external_item(x) for x in hist] == [f"i{(i + j) % N_ITEMS}" for j in range(3)], i
    again = client.post("/interactions", json=batch(acked[0])).json()
    assert again == {"accepted": 0, "duplicates": 3}
    deadline = time.monotonic() + 10
    while metric(client.get("/metrics").text, "memrec_memory_bank_size") != bank + 2 * total:
        assert time.monotonic() < deadline, (
            metric(client.get("/metrics").text, "memrec_memory_bank_size"),
            bank,
            total,
        )
        time.sleep(0.1)
    assert metric(client.get("/metrics").text, "memrec_index_size") == bank + 2 * total
    client.close()


QUERIES = [{"user_id": f"k{i}", "n": 10, "explain": True} for i in range(12)] + [
    {"user_id": "u3", "n": 10, "explain": True},
    {"user_id": "anyone", "history": ["i5", "i6", "i7"], "n": 10, "explain": True},
]


def _rankings(base: str) -> list[dict[str, Any]]:
    out = []
    for q in QUERIES:
        body = httpx.post(f"{base}/recommend", json=q, timeout=10).json()
        body["memories"] = [m["memory_id"] for m in body["memories"]]
        out.append(body)
    return out


def _replayed(log: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\((\d+) log entries replayed\)", log.read_text())]


def test_api_killed_and_restarted_answers_the_same(
    model_dir: Path,  # noqa: F811
    service_redis: str,  # noqa: F811
    server: Callable[..., tuple[str, subprocess.Popen[bytes], Path]],
) -> None:
    env = {"snapshot_interval_s": "6"}  # one snapshot between the two write phases
    base, proc, log = server(model_dir, service_redis, **env)
    wait_ready(base, proc, log)
    for i in range(6):  # before the periodic snapshot
        assert httpx.post(f"{base}/interactions", json=batch(100 + i), timeout=10).status_code == 200
    for i in range(6):
        r = httpx.post(f"{base}/interactions", json=user_batch(f"k{i}", i), timeout=10)
        assert r.status_code == 200
    deadline = time.monotonic() + 15
    while "snapshot at" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    for i in range(6, 12):  # after it: only in the log, replayed on restart
        r = httpx.post(f"{base}/interactions", json=user_batch(f"k{i}", i), timeout=10)
        assert r.status_code == 200
    before = _rankings(base)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    base, proc, log = server(model_dir, service_redis, **env)  # same log, same store folder
    wait_ready(base, proc, log)
    assert _rankings(base) == before
    assert _replayed(log)[-1] > 0, "restart should load the snapshot and replay the log after it"
    assert "rebuilding" not in log.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    # A damaged snapshot is only a cache of Redis: start-up names it, rebuilds, answers the same.
    snapshot = next((log.with_suffix(".store")).glob("*/snapshot"))
    index_file = snapshot / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:100])
    base, proc, log = server(model_dir, service_redis, **env)
    wait_ready(base, proc, log)
    assert _rankings(base) == before
    assert f"ignoring the index snapshot ({index_file}" in log.read_text()


async def test_a_replica_behind_shows_lag_and_catches_up(
    model_dir: Path,  # noqa: F811
    service_redis: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = {"model_dir": model_dir, "redis_url": service_redis}
    async with (
        running_app(**settings, store_dir=tmp_path / "a") as (_, writer),
        running_app(**settings, store_dir=tmp_path / "b") as (app_b, reader),
    ):
        store_b = app_b.state.runtime.store
        await store_b._stop_tail()  # replica b stops applying the replication log: it falls behind
        lagger = {"events": [{"user_id": "lagger", "item_id": it} for it in ("i5", "i17", "i33")]}
        assert (await writer.post("/interactions", json=lagger)).status_code == 200
        for i in range(4):
            assert (await writer.post("/interactions", json=batch(500 + i))).status_code == 200
        time.sleep(0.2)
        text = (await reader.get("/metrics")).text
        assert metric(text, "memrec_ingest_pending_entries") == 5
        assert metric(text, "memrec_ingest_lag_seconds") >= 0.2
        assert metric(text, "memrec_index_size") < metric(text, "memrec_memory_bank_size")
        query = {"user_id": "r", "history": ["i5", "i17"], "explain": True, "n": 3}  # lagger's prefix
        top = (await reader.post("/recommend", json=query)).json()["memories"][0]
        assert top["user_id"] != "lagger"

        await store_b.restore()  # what a restart does: replay what was missed, then tail again
        text = (await reader.get("/metrics")).text
        assert metric(text, "memrec_ingest_pending_entries") == 0
        assert metric(text, "memrec_ingest_lag_seconds") == 0.0
        assert metric(text, "memrec_index_size") == metric(text, "memrec_memory_bank_size")
        top = (await reader.post("/recommend", json=query)).json()["memories"][0]
        assert top["user_id"] == "lagger" and top["item_id"] == "i33"
        # And it keeps following the log live again.
        assert (await writer.post("/interactions", json=batch(600))).status_code == 200
        deadline = time.monotonic() + 5
        while metric((await reader.get("/metrics")).text, "memrec_index_size") != metric(
            (await writer.get("/metrics")).text, "memrec_index_size"
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


def test_corrupt_model_or_snapshot_stops_start_up_and_damages_nothing(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    server: Callable[..., tuple[str, subprocess.Popen[bytes], Path]],
) -> None:
    # An embedded store with some writes and a snapshot (taken at shutdown).
    base, proc, log = server(model_dir, None, log="good", snapshot_interval_s="60")
    wait_ready(base, proc, log)
    for i in range(3):
        assert httpx.post(f"{base}/interactions", json=batch(i), timeout=10).status_code == 200
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    store_dir = log.with_suffix(".store")
    before = _digest(store_dir)
    assert any(name.endswith("snapshot/index.faiss") for name in before)

    # A truncated weights file: start-up fails naming it; the store is untouched.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    serve = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model",
        str(broken),
        "--store-dir",
        str(store_dir),
    ]
    bad = subprocess.run([*serve, "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and str(weights) in bad.stderr + bad.stdout
    assert _digest(store_dir) == before

    # config.json that is not JSON: named too.
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (broken / "config.json").write_text('{"format": ')
    bad = subprocess.run([*serve, "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and str(broken / "config.json") in bad.stderr + bad.stdout

    # The embedded store's snapshot is its data: a truncated one stops start-up, naming the file,
    # and nothing in the store folder is changed.
    index_file = next(store_dir.glob("*/snapshot/index.faiss"))
    index_file.write_bytes(index_file.read_bytes()[:64])
    damaged = _digest(store_dir)
    base, proc, log = server(model_dir, None, log="good")
    assert proc.wait(timeout=120) != 0
    assert f"{index_file}: unreadable snapshot file" in log.read_text()
    assert _digest(store_dir) == damaged
