"""Redis-backend specifics: connecting, lag reporting, and a snapshot older than the trimmed log."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import RedisServer

from memory_store import Interaction, MemoryBatch, StoreConfig, open_store
from memory_store.redis_store import RedisMemoryStore, connect

DIM = 8


def keys(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


async def test_connect_gives_up_after_bounded_retries() -> None:
    config = StoreConfig(
        dim=DIM, redis_url="redis://127.0.0.1:1/0", connect_attempts=2, connect_backoff_s=0.01
    )
    with pytest.raises(ConnectionError, match="did not answer after 2 attempts"):
        await connect(config)


async def test_password_is_sent_and_never_shown(redis_server: Callable[..., RedisServer]) -> None:
    server = redis_server("--requirepass", "s3cret-pw")
    base = StoreConfig(dim=DIM, namespace="auth", redis_url=server.url, connect_attempts=1)
    with pytest.raises(ConnectionError, match="refused") as missing:
        await connect(base)
    wrong = replace(base, redis_password="wrong-pw")
    with pytest.raises(ConnectionError, match="refused the credentials") as refused:
        await connect(wrong)
    in_url = replace(base, redis_url=f"redis://:s3cret-pw@127.0.0.1:{server.port}/0")
    with pytest.raises(ConnectionError) as down:
        await connect(replace(in_url, redis_url=in_url.redis_url.replace(str(server.port), "1")))
    for exc in (missing, refused, down):
        assert "s3cret-pw" not in str(exc.value) and "wrong-pw" not in str(exc.value)
    assert "***" in str(down.value)
    # With the right password, a whole store works: write, then read back through the index.
    store = await open_store(replace(base, redis_password="s3cret-pw"))
    try:
        await store.ingest([Interaction("u", 1, 1.0, "e1")], keys(1, 0), [0])
        assert (await store.stats()).memories == 1
        assert "s3cret-pw" not in repr(store.config)
    finally:
        await store.close()


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    run = partial(subprocess.run, cwd=folder, check=True, capture_output=True)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=memrec-test-ca"])  # fmt: skip
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1"])  # fmt: skip
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"])  # fmt: skip
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


async def test_tls_with_a_ca_file(redis_server: Callable[..., RedisServer], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("this test needs the openssl command")
    ca, cert, key = _certificates(tmp_path)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
    server = redis_server("--port", "0", "--tls-port", "{port}", *tls, "--tls-auth-clients", "no")
    base = StoreConfig(dim=DIM, namespace="tls", redis_url=server.url, connect_attempts=1)
    with pytest.raises(ConnectionError):  # the server's certificate is not trusted without the CA
        await connect(base)
    store = await open_store(replace(base, redis_tls_ca_file=ca))
    try:
        await store.ingest([Interaction("u", 1, 1.0, "e1")], keys(1, 0), [0])
        assert (await store.stats()).memories == 1
        assert (await store.search(keys(1, 0), 1)).ids[0, 0] >= 1
    finally:
        await store.close()
    with pytest.raises(ValueError, match="rediss://"):
        await connect(replace(base, redis_url="redis://127.0.0.1:6379/0", redis_tls_ca_file=ca))


async def test_lag_is_reported_while_a_replica_is_behind(store_config: Callable[..., StoreConfig]) -> None:
    writer = await open_store(store_config("redis", dim=DIM, data_dir=None))
    behind = await RedisMemoryStore.open(store_config("redis", dim=DIM, data_dir=None))
    try:
        await behind._stop_tail()  # simulate a replica that stopped applying the log
        res = await writer.ingest([Interaction("u", 1, 1.0, "e1")], keys(1, 0), [0])
        await asyncio.sleep(0.05)
        status = await behind.replication()
        assert status.last == res.position and status.applied != res.position
        assert status.pending == 1 and status.lag_s >= 0.04
        assert await behind.wait_applied(res.position, 0.05) is False
        caught_up = await writer.replication()
        assert caught_up.pending == 0 and caught_up.lag_s == 0.0
    finally:
        await writer.close()
        await behind.close()


async def test_snapshot_older_than_the_trimmed_log_falls_back_to_a_rebuild(
    store_config: Callable[..., StoreConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = store_config("redis", dim=DIM, data_dir=tmp_path, stream_maxlen=10)
    store = await open_store(config)
    recent = np.array([[7, 8]] * 5)
    await store.add_memories(
        MemoryBatch.create(keys(5, 1), [1] * 5, ["u"] * 5, [0.0] * 5, [0] * 5, DIM, recent)
    )
    await store.snapshot()
    for i in range(300):  # one log entry each: the stream is trimmed past the snapshot
        await store.ingest(
            [Interaction("u", i + 1, float(i), f"e{i}")], keys(1, 100 + i), [1], np.array([[7]])
        )
    await store.remove_memories([2])
    before = await store.followers([7, 8])
    await store.close()
    with caplog.at_level(logging.WARNING, logger="memory_store.redis_store"):
        reopened = await open_store(config)
    try:
        assert "older than the trimmed log" in caplog.text
        stats = await reopened.stats()
        assert stats.memories == stats.index_size == 304
        out = await reopened.search(keys(5, 1), 1)
        assert out.ids[[0, 2, 3, 4], 0].tolist() == [1, 3, 4, 5] and out.ids[1, 0] != 2
        # the transitions come back from the memory hashes too: 7 → 1 at lag 1 by the four bank memories
        # left and the first ingested one; 8 → 1 at lag 2 by the four
        after = await reopened.followers([7, 8])
        for a, b in zip(before, after, strict=True):
            for name in ("items", "lags", "counts"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        seven, eight = after
        assert (seven.items[0], seven.lags[0], seven.counts[0]) == (1, 1, 5)
        assert (eight.items.tolist(), eight.lags.tolist(), eight.counts.tolist()) == ([1], [2], [4])
    finally:
        await reopened.close()


async def test_snapshot_of_an_emptied_namespace_is_not_restored(
    store_config: Callable[..., StoreConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis lost the namespace (FLUSHDB, a restart without persistence) but the replica kept its
    snapshot: memory ids restart at 1, so restoring it would shadow the new memories under old ids."""
    import redis

    config = store_config("redis", dim=DIM, data_dir=tmp_path)
    old_keys, new_keys = keys(5, 1), keys(5, 2)
    store = await open_store(config)
    await store.add_memories(MemoryBatch.create(old_keys, [1] * 5, ["old"] * 5, [0.0] * 5, [0] * 5, DIM))
    await store.snapshot()
    await store.close()
    redis.Redis.from_url(str(config.redis_url)).flushdb()
    with caplog.at_level(logging.WARNING, logger="memory_store.redis_store"):
        reopened = await open_store(config)
    try:
        assert "before the namespace was emptied" in caplog.text
        assert (await reopened.stats()).index_size == 0
        res = await reopened.add_memories(
            MemoryBatch.create(new_keys, [2] * 5, ["new"] * 5, [0.0] * 5, [0] * 5, DIM)
        )
        assert res.memory_ids.tolist() == [1, 2, 3, 4, 5]  # the old snapshot's ids, reused
        out = await reopened.search(new_keys, 1)
        assert out.ids[:, 0].tolist() == [1, 2, 3, 4, 5] and set(out.users[:, 0]) == {"new"}
        assert np.allclose(out.scores[:, 0], 1.0, atol=1e-5)
    finally:
        await reopened.close()
    # A snapshot of the live dataset is still restored (no rebuild) on the next start.
    again_store = await open_store(config)
    await again_store.snapshot()
    await again_store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memory_store.redis_store"):
        again = await open_store(config)
    try:
        assert "ignoring the index snapshot" not in caplog.text
        assert (await again.stats()).index_size == 5
    finally:
        await again.close()


async def test_a_namespace_emptied_while_running_is_rebuilt(
    store_config: Callable[..., StoreConfig], caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    config = store_config("redis", dim=DIM, data_dir=None)
    store = await open_store(config)
    try:
        old = MemoryBatch.create(keys(5, 1), [1] * 5, ["old"] * 5, [0.0] * 5, [0] * 5, DIM)
        await store.add_memories(old)
        redis.Redis.from_url(str(config.redis_url)).flushdb()
        with caplog.at_level(logging.ERROR, logger="memory_store.redis_store"):
            res = await store.add_memories(
                MemoryBatch.create(keys(3, 2), [2] * 3, ["new"] * 3, [0.0] * 3, [0] * 3, DIM)
            )
            assert res.memory_ids.tolist() == [1, 2, 3]
            for _ in range(60):  # the tail checks the epoch every EPOCH_CHECK_S
                if (await store.stats()).index_size == 3:
                    break
                await asyncio.sleep(0.1)
        assert "emptied or recreated" in caplog.text
        out = await store.search(keys(3, 2), 1)
        assert out.ids[:, 0].tolist() == [1, 2, 3] and set(out.users[:, 0]) == {"new"}
    finally:
        await store.close()


async def test_writes_survive_a_flushed_script_cache(store_config: Callable[..., StoreConfig]) -> None:
    """After a Redis restart the script cache is empty: single and pipelined writes re-load the scripts."""
    import redis

    admin = redis.Redis.from_url(str(store_config("redis").redis_url))
    store = await open_store(store_config("redis", dim=DIM, data_dir=None))
    try:
        admin.script_flush()
        one = await store.ingest([Interaction("u", 1, 1.0, "e1")], keys(1, 0), [0])
        admin.script_flush()
        batch = MemoryBatch.create(keys(2500, 1), [1] * 2500, ["u"] * 2500, [0.0] * 2500, [0] * 2500, DIM)
        many = await store.add_memories(batch)
        admin.script_flush()
        assert await store.remove_memories([1]) == 1
        assert one.memory_ids.tolist() == [1] and many.memory_ids.tolist() == list(range(2, 2502))
        assert (await store.stats()).memories == 2500
    finally:
        await store.close()
        admin.close()
