"""The Redis store on Redis Cluster: a namespace spread over every master in hash-tag slot groups
(memory_store/redis_store/groups.py), the global capacity enforced per group, the group count fixed for
a namespace's lifetime, every group's log tail stopped by close, and a master's failover under writes,
with and without WAIT (``redis_wait_replicas``). Replication between two processes on the cluster is in
test_store_multiprocess.py.

The tests before the failover ones use the session's cluster (``cluster_redis_url``: 3 masters, no
replicas). The failover tests start clusters of their own (``redis_cluster``): a replica for each master
(WAIT 1 needs one everywhere), or one replica of the first master for the lossy failover, which makes
a failover lose writes on purpose (the writer's index must then rebuild to match Redis).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from conftest import RedisServer
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError
from redis_cluster import RedisClusterNodes, node_client
from test_store_multiprocess import key_for

from memory_store import IndexParams, Interaction, MemoryStore, StoreConfig, open_store
from memory_store.redis_store import layout
from memory_store.redis_store.groups import SlotGroups
from memory_store.redis_store.store import ReplicationTimeout
from model.transitions import MAX_ORDER

log = logging.getLogger("memrec.tests")

DIM = 8
GROUPS = 16  # StoreConfig's slot groups on a cluster by default (config.CLUSTER_SLOT_GROUPS)


def unit_keys(n: int, seed: int) -> np.ndarray:
    """(n, DIM) float32 random keys (the store normalises them)."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def primary_dbsizes(url: str) -> dict[str, int]:
    """Keys per master of the cluster at ``url``, ``host:port -> DBSIZE``."""
    with RedisCluster.from_url(url) as client:
        return {node.name: int(client.dbsize(target_nodes=node)) for node in client.get_primaries()}


async def held_ids(store: MemoryStore) -> list[int]:
    """Every memory id in this process's index (an exhaustive search), sorted."""
    size = (await store.stats()).index_size
    res = await store.search(np.ones((1, DIM), np.float32), max(size, 1))
    return sorted(int(i) for i in res.ids[0] if i >= 0)


# ------------------------------------------------------------------------------- the session cluster


async def test_a_namespace_spreads_over_every_master(
    store_config: Callable[..., StoreConfig], cluster_redis_url: str
) -> None:
    users = [f"user{u}" for u in range(200)]
    rounds = 3  # each user interacts with items 1000 * round + user
    store = await open_store(store_config("cluster", history_len=10))
    try:
        written: list[int] = []
        for r in range(rounds):
            events = [
                Interaction(user, 1000 * r + u + 1, float(r), f"e{r}.{u}") for u, user in enumerate(users)
            ]
            res = await store.ingest(events, unit_keys(len(events), r), [r] * len(events))
            assert (res.accepted, res.duplicates) == (len(users), 0)
            written += res.memory_ids.tolist()
        assert len(set(written)) == rounds * len(users) and min(written) >= 1

        sizes = primary_dbsizes(cluster_redis_url)
        assert len(sizes) >= 3 and all(n > 0 for n in sizes.values()), sizes
        assert min(sizes.values()) > max(sizes.values()) / 3, sizes  # spread, not all on one master

        histories = await store.histories(users, 10)
        assert histories == [[1000 * r + u + 1 for r in range(rounds)] for u in range(len(users))]
        assert await held_ids(store) == sorted(written)
        stats = await store.stats()
        assert stats.backend == "redis-cluster"
        assert stats.memories == stats.index_size == rounds * len(users)
        logged = await store.interactions(count=10_000)
        assert sorted(logged.event_ids) == sorted(
            f"e{r}.{u}" for r in range(rounds) for u in range(len(users))
        )
    finally:
        await store.close()


async def test_capacity_is_each_groups_share(store_config: Callable[..., StoreConfig]) -> None:
    """capacity 32 over 16 groups: 2 per group, each group's 2 newest (largest seq, so largest id)."""
    groups = SlotGroups.of("test", GROUPS)
    users = [f"user{u}" for u in range(64)]
    assert {groups.of_user(u) for u in users} == set(range(GROUPS))  # every group gets writes
    store = await open_store(store_config("cluster", capacity=32))
    try:
        assert store.config.groups == GROUPS
        written: list[int] = []
        for r in range(12):  # over time: 12 writes of 16 users each, a different 16 every round
            round_users = users[(16 * r) % 64 : (16 * r) % 64 + 16]
            events = [Interaction(u, 100 * r + i + 1, float(r)) for i, u in enumerate(round_users)]
            res = await store.ingest(events, unit_keys(len(events), r), [0] * len(events))
            written += res.memory_ids.tolist()
            held = await held_ids(store)
            assert len(held) <= 32
            by_group = np.bincount(np.asarray(held, np.int64) % GROUPS, minlength=GROUPS)
            assert by_group.max() <= 2, by_group

        written_arr = np.asarray(written, np.int64)
        newest = sorted(
            int(i) for g in range(GROUPS) for i in np.sort(written_arr[written_arr % GROUPS == g])[-2:]
        )
        assert all((written_arr % GROUPS == g).sum() > 2 for g in range(GROUPS))  # each group evicted
        assert await held_ids(store) == newest
        stats = await store.stats()
        assert stats.memories == stats.index_size == 32
    finally:
        await store.close()


async def test_a_store_of_another_group_count_refuses_the_namespace(
    store_config: Callable[..., StoreConfig],
) -> None:
    first = await open_store(store_config("cluster", slot_groups=16))
    await first.append_interactions([Interaction("u", 1, 1.0, "e1")])
    await first.close()
    with pytest.raises(ValueError, match="slot groups"):
        await open_store(store_config("cluster", slot_groups=8))
    again = await open_store(store_config("cluster"))  # the default on a cluster: 16, as it was laid out
    try:
        assert await again.histories(["u"], 5) == [[1]]
    finally:
        await again.close()


async def test_close_stops_every_groups_log_tail(store_config: Callable[..., StoreConfig]) -> None:
    """A cluster store tails 16 log streams, one task each; close() returns only once all have ended
    (a tail left running would read with closed clients, and keep an event loop from closing)."""
    for _ in range(5):
        store = await open_store(store_config("cluster"))
        await store.append_interactions([Interaction("u", 1, 1.0)])
        await asyncio.sleep(0.05)  # every tail inside its blocking read
        await store.close()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert left == [], [t.get_coro().__qualname__ for t in left]


# ------------------------------------------------------------------------------------------ failover

# What a write may raise while a master is down or its shard has no replica: the client retries it with
# the same event id (redis-py's errors are RedisErrors, but for RedisClusterException).
RETRYABLE = (ReplicationTimeout, ConnectionError, TimeoutError, RedisError, RedisClusterException)
RETRY_SLEEP_S = 0.05
WRITE_DEADLINE_S = 60.0  # every event acknowledged within this, or the test fails
HANG_S = 10.0  # one call that takes longer is a hang: the test fails with it
PACE_S = 0.005  # between one event's acknowledgement and the next event


@dataclass
class WriteLog:
    """What the writer did: event i (user, item i, event id ``ev{i}``) acknowledged at time t (its
    successful attempt sent at ``sent[i]``), and the errors its attempts raised, (t, type name); times
    are ``time.monotonic()``."""

    users: Sequence[str]
    acked: dict[int, float] = field(default_factory=dict)
    sent: dict[int, float] = field(default_factory=dict)
    errors: list[tuple[float, str]] = field(default_factory=list)

    def user(self, i: int) -> str:
        return self.users[i % len(self.users)]

    def acked_between(self, start: float, end: float = float("inf")) -> int:
        return sum(1 for t in self.acked.values() if start <= t <= end)

    def errors_since(self, start: float, name: str) -> int:
        return sum(1 for t, kind in self.errors if t >= start and kind == name)

    def error_counts(self) -> dict[str, int]:
        return dict(Counter(kind for _, kind in self.errors))


async def write_until(store: MemoryStore, writes: WriteLog, stop: asyncio.Event) -> None:
    """Ingest events one at a time until ``stop``; a failed call is retried with the same event id after
    a short sleep until it returns, as a client of the service would."""
    deadline = time.monotonic() + WRITE_DEADLINE_S
    i = 0
    while not stop.is_set():
        i += 1
        event = Interaction(writes.user(i), i, float(i), f"ev{i}")
        while True:
            timer = asyncio.timeout(HANG_S)
            sent = time.monotonic()
            try:
                async with timer:
                    await store.ingest([event], key_for(i), [0])
                break
            except RETRYABLE as exc:
                if timer.expired():
                    raise AssertionError(f"ingest of event {i} hung for {HANG_S:g} s") from exc
                writes.errors.append((time.monotonic(), type(exc).__name__))
                if time.monotonic() > deadline:
                    raise AssertionError(f"event {i} not acknowledged in {WRITE_DEADLINE_S:g} s") from exc
                await asyncio.sleep(RETRY_SLEEP_S)
        writes.acked[i], writes.sent[i] = time.monotonic(), sent
        await asyncio.sleep(PACE_S)


async def until(what: str, check: Callable[[], bool], task: asyncio.Task[None], timeout: float) -> None:
    """Wait for ``check()`` while ``task`` runs (its failure is raised here)."""
    deadline = time.monotonic() + timeout
    while not check():
        if task.done():
            task.result()
            raise AssertionError(f"the writer stopped before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.02)


def users_by_master(
    nodes: RedisClusterNodes, groups: SlotGroups, master: int, count: int = 4
) -> tuple[list[str], list[str]]:
    """``count`` users whose group's log is in a slot of ``master``, and ``count`` whose is elsewhere."""
    ranges = nodes.slot_ranges(master)
    on, off = [], []
    for u in range(1000):
        user = f"user{u}"
        slot = key_slot((groups.prefix(groups.of_user(user)) + layout.LOG).encode())
        (on if any(a <= slot <= b for a, b in ranges) else off).append(user)
    assert len(on) >= count and len(off) >= count
    return on[:count], off[:count]


async def nearest_items(store: MemoryStore, events: list[int]) -> dict[int, int]:
    """The item of the memory nearest to each event's key (``key_for``), by event."""
    if not events:
        return {}
    res = await store.search(np.concatenate([key_for(i) for i in events]), 1)
    return dict(zip(events, res.items[:, 0].tolist(), strict=True))


def failover_config(url: str, wait_replicas: int, data_dir: Path | None) -> StoreConfig:
    """The store of the failover tests (as ``store_config("cluster")``, on a cluster of their own):
    histories long enough to hold every event, read-your-writes on."""
    return StoreConfig(
        dim=DIM,
        namespace="test",
        redis_url=url,
        redis_cluster=True,
        redis_wait_replicas=wait_replicas,
        redis_wait_timeout_ms=500,
        read_your_writes=True,
        history_len=10_000,
        data_dir=data_dir,
        index=IndexParams(exact_threshold=10_000, min_nlist=8),
        recent_width=MAX_ORDER,
    )


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait", "no-wait"])
async def test_writes_survive_a_master_failover(
    wait_replicas: int, redis_cluster: Callable[..., RedisClusterNodes], tmp_path: Path
) -> None:
    """Kill a master under a stream of writes (retried with the same event id until acknowledged).
    With WAIT no acknowledged write is lost: the shard's writes fail while its master is down and time
    out while the promoted replica has no replica of its own, and resume once the killed node is back as
    one. Without WAIT they resume after the promotion, and the loss is bounded by what the old master
    had acknowledged and not yet passed on. Either way a new store's index matches Redis."""
    began = time.monotonic()
    nodes = redis_cluster(masters=3, replicas=3, spread_replicas=True)  # WAIT 1 needs a replica each
    master, replica = nodes.ports[0], nodes.replica_ports[0]
    assert nodes.replica_of(0) == master
    config = failover_config(nodes.url, wait_replicas, tmp_path / "writer")
    on_master, elsewhere = users_by_master(nodes, SlotGroups.of(config.namespace, config.groups), master)
    writes = WriteLog([u for pair in zip(on_master, elsewhere, strict=True) for u in pair])
    store = await open_store(config)
    stop = asyncio.Event()
    writer = asyncio.create_task(write_until(store, writes, stop))
    try:
        await until("100 writes", lambda: len(writes.acked) >= 100, writer, 10.0)
        nodes.kill(master)
        killed = time.monotonic()
        promoted_s = await asyncio.to_thread(nodes.wait_promoted, replica)
        restarting = promoted = time.monotonic()
        if wait_replicas:  # the shard has no replica now: its writes time out until the node is back
            refused = lambda: writes.errors_since(promoted, "ReplicationTimeout") >= 2  # noqa: E731
            await until("2 ReplicationTimeouts after the promotion", refused, writer, 15.0)
            restarting = time.monotonic()
            await asyncio.to_thread(nodes.restart, master)
        recovered = time.monotonic()
        await until(
            "100 writes after the recovery", lambda: writes.acked_between(recovered) >= 100, writer, 20.0
        )
        stop.set()
        await writer
        assert await store.wait_applied((await store.replication()).last, 10.0)
        writer_stats = await store.stats()
        writer_found = await nearest_items(store, sorted(writes.acked))
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await store.close()

    # A new store, on a master that never died: what Redis holds now.
    survivor = nodes.master_ports()[-1]
    fresh = await open_store(replace(config, redis_url=f"redis://127.0.0.1:{survivor}/0", data_dir=None))
    try:
        histories = await fresh.histories(list(writes.users), 10_000)
        assert await fresh.wait_applied((await fresh.replication()).last, 10.0)
        stats = await fresh.stats()
        found = await nearest_items(fresh, sorted(writes.acked))
    finally:
        await fresh.close()

    held = dict(zip(writes.users, histories, strict=True))
    assert all(len(h) == len(set(h)) for h in held.values()), "an event was applied twice"
    assert all(i in writes.acked for h in held.values() for i in h)  # every event held was acknowledged
    lost = sorted(i for i in writes.acked if i not in set(held[writes.user(i)]))
    recent = sum(killed - 2.0 <= t <= killed for t in writes.sent.values())  # sent before the kill
    # when the failed-over shard's writes sent after the kill were acknowledged
    shard_after = [
        t for i, t in writes.acked.items() if writes.user(i) in on_master and writes.sent[i] > killed
    ]
    log.info(
        "memrec tests: failover with WAIT %d: %d events acknowledged (%d before the kill), %d lost %s "
        "(%d sent in the 2 s before the kill); promotion %.2f s, the shard's first write "
        "acknowledged %.2f s after the kill; errors %s; writer's index %d of %d memories; %.1f s in all",
        wait_replicas,
        len(writes.acked),
        writes.acked_between(0.0, killed),
        len(lost),
        lost[:10],
        recent,
        promoted_s,
        min(shard_after, default=float("nan")) - killed,
        writes.error_counts(),
        writer_stats.index_size,
        writer_stats.memories,
        time.monotonic() - began,
    )
    assert {writes.user(i) for i in lost} <= set(on_master), "a write to a master that stayed up was lost"
    assert sum(t > recovered for t in shard_after) >= 40  # the failed-over shard takes writes again
    if wait_replicas:
        assert lost == []
        # nothing sent after the kill was acknowledged before the shard had a replica again
        assert min(shard_after) > restarting
    else:
        assert len(lost) <= recent
    # The indexes hold what Redis holds: the count, and each held event's memory under its own key.
    kept = {i: i for h in held.values() for i in h}
    assert stats.memories == stats.index_size == len(kept)
    assert {i: found[i] for i in kept} == kept
    if not lost:  # after a loss the writer's index is known to go wrong: see the lossy failover test
        assert writer_stats.memories == writer_stats.index_size == len(kept)
        assert {i: writer_found[i] for i in kept} == kept


def lose_the_next_writes(nodes: RedisClusterNodes, master: int, replica: int) -> RedisServer:
    """Make the master's next writes unreachable for its replica: stop the replica (SIGSTOP), then have
    the master drop it (a 1 MB output-buffer limit for replicas, overrun by a 32 MB value, deleted
    after). The caller kills the master and resumes the replica (SIGCONT): the replica, promoted, never
    got those writes. Returns the stopped replica's server."""
    server = next(s for s in nodes.servers if s.port == replica)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    ranges = nodes.slot_ranges(master)
    filler = next(
        f"filler{i}"
        for i in range(10_000)
        if any(a <= key_slot(f"filler{i}".encode()) <= b for a, b in ranges)
    )
    with node_client(master) as client:
        client.config_set("client-output-buffer-limit", "replica 1048576 1048576 0")
        client.set(filler, b"x" * (32 << 20))
        deadline = time.monotonic() + 10.0
        while int(client.info("replication")["connected_slaves"]):
            assert time.monotonic() < deadline, "the master kept its stopped replica"
            time.sleep(0.01)
        client.delete(filler)
    return server


async def test_a_lossy_failover_leaves_the_writers_index_matching_redis(
    redis_cluster: Callable[..., RedisClusterNodes],
) -> None:
    """Without WAIT a failover may lose acknowledged writes (events 6-10 here, on purpose). Redis is
    then consistent again, but the promoted master's id sequence is behind: events 11-15 get the lost
    memories' ids. The writer's index, which applied the lost memories, must end up holding what Redis
    holds (each event's memory found by its key) rather than the lost ones under reused ids: log entries
    are numbered per group, so the writer's tail sees the promoted master's log number on from before
    the lost entries, and rebuilds its index from the hashes."""
    nodes = redis_cluster(masters=3, replicas=1)
    master, replica = nodes.ports[0], nodes.replica_ports[0]
    config = failover_config(f"redis://127.0.0.1:{nodes.ports[1]}/0", 0, None)
    [user], _ = users_by_master(nodes, SlotGroups.of(config.namespace, config.groups), master, 1)
    store = await open_store(config)
    try:

        async def ingest(i: int) -> int:
            deadline = time.monotonic() + 15.0
            while True:
                try:
                    res = await store.ingest([Interaction(user, i, float(i), f"ev{i}")], key_for(i), [0])
                    return int(res.memory_ids[0])
                except RETRYABLE:
                    assert time.monotonic() < deadline, f"event {i} not acknowledged after the failover"
                    await asyncio.sleep(RETRY_SLEEP_S)

        before = [await ingest(i) for i in range(1, 6)]
        with node_client(master) as client:
            assert client.wait(1, 2000) == 1  # events 1-5 are on the replica
        stopped = lose_the_next_writes(nodes, master, replica)
        lost = [await ingest(i) for i in range(6, 11)]  # acknowledged by the master alone
        nodes.kill(master)
        assert stopped.proc is not None
        os.kill(stopped.proc.pid, signal.SIGCONT)
        await asyncio.to_thread(nodes.wait_promoted, replica)
        after = [await ingest(i) for i in range(11, 16)]
        assert await store.histories([user], 100) == [[1, 2, 3, 4, 5, 11, 12, 13, 14, 15]]  # 6-10 lost
        assert set(after) == set(lost) and not set(after) & set(before)  # ids of lost memories, reused
        assert await store.wait_applied((await store.replication()).last, 10.0)
        found = await nearest_items(store, list(range(1, 6)) + list(range(11, 16)))
    finally:
        await store.close()
    expected = {i: i for i in [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]}
    assert found == expected, f"the writer's index finds items {found} by the events' keys"
