"""Store instances in separate processes (spawned) on one Redis, and kill/restart of either backend.

Each worker is a module-level function, so the spawn start method can import it in the child.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memory_store import IndexParams, Interaction, MemoryStore, StoreConfig, open_store

CTX = mp.get_context("spawn")
DIM = 8
STEP_TIMEOUT_S = 30.0


def key_for(i: int) -> np.ndarray:
    """The key vector of event i: reproducible in every process. (1, DIM) float32."""
    return np.random.default_rng(i).standard_normal((1, DIM)).astype(np.float32)


def events_for(first: int, last: int) -> list[Interaction]:
    """Event i: user ``u{i % 17}`` interacts with item i; the event id is ``ev{i}``."""
    return [Interaction(f"u{i % 17}", i, float(i), f"ev{i}") for i in range(first, last)]


async def _write_events(config: StoreConfig, first: int, last: int, batch: int, acks: Any) -> None:
    store = await open_store(config)
    for start in range(first, last, batch):
        events = events_for(start, min(start + batch, last))
        keys = np.concatenate([key_for(ev.item_id) for ev in events])
        res = await store.ingest(events, keys, [ev.item_id % 50 for ev in events])
        acks.put((start, res.memory_ids.tolist()))
    acks.put(None)
    await store.close()


def writer_process(config: StoreConfig, first: int, last: int, batch: int, acks: Any) -> None:
    asyncio.run(_write_events(config, first, last, batch, acks))


async def _serve_replica(config: StoreConfig, commands: Any, replies: Any) -> None:
    store = await open_store(config)
    replies.put("ready")
    while True:
        cmd = await asyncio.to_thread(commands.get)
        if cmd[0] == "exit":
            break
        if cmd[0] == "wait":  # ("wait", position, key): wait for the position, then search the key
            ok = await store.wait_applied(cmd[1], 5.0)
            seen_at = time.time()
            res = await store.search(cmd[2], 1)
            replies.put((ok, seen_at, int(res.ids[0, 0])))
    await store.close()


def replica_process(config: StoreConfig, commands: Any, replies: Any) -> None:
    asyncio.run(_serve_replica(config, commands, replies))


@pytest.fixture
def spawn() -> Iterator[Callable[..., BaseProcess]]:
    """Start a spawned process; every process is killed and joined at teardown, whatever happened."""
    started: list[BaseProcess] = []

    def start(target: Callable[..., None], *args: Any) -> BaseProcess:
        proc = CTX.Process(target=target, args=args, daemon=True)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)


def drain(acks: Any, until_done: bool) -> tuple[dict[int, list[int]], bool]:
    """Acknowledged batches {first event: memory ids}; ``done`` when the writer sent its final None."""
    got: dict[int, list[int]] = {}
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            item = acks.get(timeout=0.5 if until_done else 0.05)
        except queue.Empty:
            if until_done:
                continue
            return got, False
        if item is None:
            return got, True
        got[item[0]] = item[1]
    raise AssertionError("writer process did not finish in time")


async def held_ids(store: MemoryStore) -> np.ndarray:
    """Every memory id in this process's index (exhaustive search), sorted."""
    size = (await store.stats()).index_size
    res = await store.search(np.ones((1, DIM), np.float32), max(size, 1))
    return np.sort(res.ids[0][res.ids[0] >= 0])


async def held_items(store: MemoryStore) -> np.ndarray:
    size = (await store.stats()).index_size
    res = await store.search(np.ones((1, DIM), np.float32), max(size, 1))
    return np.sort(res.items[0][res.ids[0] >= 0])


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_write_on_a_is_searchable_on_b(
    backend: str, store_config: Callable[..., StoreConfig], spawn: Any
) -> None:
    """On one Redis, and on a Redis Cluster (a position of 16 groups' log ids)."""
    config_b = store_config(backend, dim=DIM, data_dir=None)
    commands, replies = CTX.Queue(), CTX.Queue()
    spawn(replica_process, config_b, commands, replies)
    assert replies.get(timeout=STEP_TIMEOUT_S) == "ready"
    store_a = await open_store(store_config(backend, dim=DIM, data_dir=None))
    lags = []
    try:
        for i in range(1, 41):
            t0 = time.time()
            res = await store_a.ingest(events_for(i, i + 1), key_for(i), [0])
            commands.put(("wait", res.position, key_for(i)))
            ok, seen_at, top = replies.get(timeout=STEP_TIMEOUT_S)
            assert ok and top == int(res.memory_ids[0])
            lags.append(seen_at - t0)
        commands.put(("exit",))
    finally:
        await store_a.close()
    assert float(np.percentile(lags, 99)) < 0.5


async def test_duplicate_event_ids_from_two_processes_apply_once(
    store_config: Callable[..., StoreConfig], spawn: Any
) -> None:
    config = store_config("redis", dim=DIM, data_dir=None)
    acks = [CTX.Queue(), CTX.Queue()]
    procs = [spawn(writer_process, config, 1, 801, 20, q) for q in acks]
    results = [drain(q, until_done=True)[0] for q in acks]
    for proc in procs:
        proc.join(timeout=STEP_TIMEOUT_S)
        assert proc.exitcode == 0
    created = [i for r in results for ids in r.values() for i in ids if i >= 0]
    assert len(created) == 800 and len(set(created)) == 800  # each event accepted by exactly one writer
    store = await open_store(config)
    try:
        assert (await held_items(store)).tolist() == list(range(1, 801))
        assert (await store.stats()).memories == 800
    finally:
        await store.close()


async def test_concurrent_writers_get_distinct_ids_and_all_replicas_agree(
    store_config: Callable[..., StoreConfig], spawn: Any
) -> None:
    config = store_config("redis", dim=DIM, data_dir=None)
    reader = await open_store(config)
    try:
        acks = [CTX.Queue(), CTX.Queue()]
        procs = [spawn(writer_process, config, 1 + 500 * w, 501 + 500 * w, 5, acks[w]) for w in (0, 1)]
        results = [drain(q, until_done=True)[0] for q in acks]
        for proc in procs:
            proc.join(timeout=STEP_TIMEOUT_S)
            assert proc.exitcode == 0
        ids = sorted(i for r in results for batch in r.values() for i in batch)
        assert ids == list(range(1, 1001))
        last = (await reader.replication()).last
        assert await reader.wait_applied(last, 10.0)
        assert (await held_ids(reader)).tolist() == ids
        assert await reader.histories(["u0"], 1000) != [[]]
    finally:
        await reader.close()


@pytest.mark.parametrize("backend", ["redis", "embedded"])
async def test_kill_and_restart_loses_and_doubles_nothing(
    backend: str, store_config: Callable[..., StoreConfig], spawn: Any, tmp_path: Path
) -> None:
    """SIGKILL a writer mid-stream; on restart every acknowledged write is there exactly once, and
    re-sending every event (same ids) completes the set without doubling any."""
    exact = IndexParams(exact_threshold=1_000_000)  # so that held_items() is exhaustive
    config = store_config(backend, dim=DIM, data_dir=tmp_path / "writer", index=exact)
    total = 20_000
    acks = CTX.Queue()
    proc = spawn(writer_process, config, 1, total + 1, 10, acks)
    acked: dict[int, list[int]] = {}
    while len(acked) < 40:
        item = acks.get(timeout=STEP_TIMEOUT_S)
        assert item is not None, "writer finished before it could be killed; raise `total`"
        acked[item[0]] = item[1]
    proc.kill()
    proc.join(timeout=STEP_TIMEOUT_S)
    acked.update(drain(acks, until_done=False)[0])

    store = await open_store(config)
    try:
        items = await held_items(store)
        assert len(items) == len(set(items.tolist())), "an event was applied twice"
        acked_items = {start + j for start, ids in acked.items() for j in range(len(ids))}
        assert acked_items <= set(items.tolist()), "an acknowledged write was lost"
        stats = await store.stats()
        assert stats.memories == stats.index_size == len(items)
        redo = await store.ingest(
            events_for(1, total + 1),
            np.concatenate([key_for(i) for i in range(1, total + 1)]),
            [i % 50 for i in range(1, total + 1)],
        )
        assert redo.accepted == total - len(items) and redo.duplicates == len(items)
        assert (await held_items(store)).tolist() == list(range(1, total + 1))
        histories = await store.histories([f"u{i}" for i in range(17)], total)
        assert all(len(h) == config.history_len == len(set(h)) for h in histories)
    finally:
        await store.close()


async def test_replica_restart_from_snapshot_matches_a_full_rebuild(
    store_config: Callable[..., StoreConfig], spawn: Any, tmp_path: Path
) -> None:
    """A replica restarted from its snapshot + log replay holds exactly the ids of a replica rebuilt from
    the Redis hashes, while a writer in another process keeps writing and removing."""
    replica_config = store_config("redis", dim=DIM, data_dir=tmp_path / "replica")
    replica = await open_store(replica_config)
    acks = CTX.Queue()
    proc = spawn(
        writer_process, store_config("redis", dim=DIM, data_dir=None, capacity=1500), 1, 2001, 10, acks
    )
    done = False
    try:
        while not done and (await replica.stats()).index_size < 300:
            done = drain(acks, until_done=False)[1]
            await asyncio.sleep(0.01)
        snap = await replica.snapshot()  # mid-stream: the writer keeps going
        assert snap.memories > 0
    finally:
        await replica.close()
    if not done:
        drain(acks, until_done=True)
    proc.join(timeout=STEP_TIMEOUT_S)
    assert proc.exitcode == 0

    restarted = await open_store(replica_config)
    rebuilt = await open_store(store_config("redis", dim=DIM, data_dir=tmp_path / "fresh"))
    try:
        a, b = await held_ids(restarted), await held_ids(rebuilt)
        assert a.tolist() == b.tolist() and len(a) == 1500
        assert a.tolist() == list(range(501, 2001))  # capacity 1500 kept the newest
    finally:
        await restarted.close()
        await rebuilt.close()
