"""The embedded backend's append-only log: torn tails, segments, and restart from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memory_store import Interaction, StoreConfig, open_store
from memory_store.wal import AppendLog


def test_torn_tail_is_truncated_and_the_log_continues(tmp_path: Path) -> None:
    log = AppendLog(tmp_path, fsync=False)
    for i in range(3):
        log.append("write", {"i": i}, {"x": np.arange(i + 1, dtype=np.int64)})
    log.close()
    segment = next(tmp_path.glob("log-*.wal"))
    size = segment.stat().st_size
    with segment.open("ab") as f:
        f.write(b"\x31\x4d\x45\x4d\xff\x00")  # a crash in the middle of a record header
    reopened = AppendLog(tmp_path, fsync=False)
    assert reopened.last_lsn == 3 and segment.stat().st_size == size
    assert reopened.append("write", {"i": 3}, {}) == 4
    records = list(reopened.replay(after_lsn=1))
    assert [r.lsn for r in records] == [2, 3, 4]
    assert records[1].arrays["x"].tolist() == [0, 1, 2] and records[2].meta == {"i": 3}
    reopened.close()


def test_rotation_and_dropping_covered_segments(tmp_path: Path) -> None:
    log = AppendLog(tmp_path, fsync=True)
    log.append("a", {}, {})
    log.append("b", {}, {})
    log.rotate()
    log.append("c", {}, {})
    log.drop_through(2)
    assert [r.op for r in log.replay(0)] == ["c"]
    assert len(list(tmp_path.glob("log-*.wal"))) == 1
    log.close()


async def test_embedded_store_recovers_from_a_corrupt_last_record(tmp_path: Path) -> None:
    config = StoreConfig(dim=4, namespace="wal", data_dir=tmp_path)
    store = await open_store(config)
    await store.ingest([Interaction("u", 1, 1.0, "a")], np.eye(4, dtype=np.float32)[:1], [0])
    await store.ingest([Interaction("u", 2, 2.0, "b")], np.eye(4, dtype=np.float32)[1:2], [1])
    await store.close()
    segment = next((tmp_path / "wal" / "log").glob("log-*.wal"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # the second write was never fully on disk
    reopened = await open_store(config)
    try:
        assert await reopened.histories(["u"], 5) == [[1]]
        assert (await reopened.stats()).memories == 1
        again = await reopened.ingest([Interaction("u", 2, 2.0, "b")], np.eye(4, dtype=np.float32)[1:2], [1])
        assert again.accepted == 1 and again.memory_ids.tolist() == [2]
    finally:
        await reopened.close()


async def test_second_process_cannot_open_the_same_directory(tmp_path: Path) -> None:
    config = StoreConfig(dim=4, namespace="lock", data_dir=tmp_path)
    store = await open_store(config)
    try:
        import pytest

        with pytest.raises(RuntimeError, match="in use"):
            await open_store(config)
    finally:
        await store.close()
