"""The FAISS wrapper alone: concurrency under the readers-writer lock, rebuilds, metadata bookkeeping."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from memory_store.base import MemoryBatch
from memory_store.config import IndexParams
from memory_store.index import MemoryIndex, choose_nlist, search_now
from memory_store.snapshot import IndexImage
from memory_store.transitions import TransitionTable

DIM = 16


def batch(ids: np.ndarray, rng: np.random.Generator) -> MemoryBatch:
    n = ids.size
    return MemoryBatch.create(
        rng.standard_normal((n, DIM)).astype(np.float32),
        ids * 10,
        [f"u{i % 5}" for i in ids.tolist()],
        ids.astype(np.float64),
        ids % 7,
        DIM,
    )


def test_concurrent_adds_removes_and_searches_never_return_removed_ids() -> None:
    """One writer (adds, removes, and a flat -> IVF rebuild) against two searching threads."""
    index = MemoryIndex(DIM, IndexParams(exact_threshold=3_000, min_nlist=16, nprobe=8))
    rng = np.random.default_rng(0)
    removed: set[int] = set()
    removed_lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0, 0]
    added = [0]  # ids 1..added[0] were added, whatever number of rounds the writer ran

    def writer() -> None:
        # At least 40 rounds, and on until each searcher has searched 20 times in between (a bounded
        # wait): how many searches fit into 40 rounds depends on the machine and the scheduler.
        deadline = time.monotonic() + 30.0
        step = 0
        try:
            while step < 40 or (min(searches) < 20 and time.monotonic() < deadline):
                ids = np.arange(step * 200 + 1, step * 200 + 201, dtype=np.int64)
                index.add(ids, batch(ids, rng))
                gone = ids[rng.random(ids.size) < 0.5]
                index.remove(gone)
                with removed_lock:
                    removed.update(gone.tolist())
                step += 1
                added[0] = int(ids[-1])
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def searcher(slot: int) -> None:
        local = np.random.default_rng(slot + 1)
        try:
            while not stop.is_set():
                with removed_lock:
                    gone_before = set(removed)
                queries = local.standard_normal((4, DIM)).astype(np.float32)
                queries /= np.linalg.norm(queries, axis=1, keepdims=True)
                out = index.search(queries, 20)
                hits = {int(i) for i in out.ids.ravel() if i >= 0}
                assert not hits & gone_before, f"removed ids returned: {sorted(hits & gone_before)[:5]}"
                valid = out.ids >= 0
                assert (out.items[valid] == out.ids[valid] * 10).all()  # metadata matches its id
                searches[slot] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=searcher, args=(s,)) for s in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert min(searches) >= 20
    assert index.kind.startswith("ivf")
    assert added[0] >= 8_000  # at least the 40 rounds
    expected = set(range(1, added[0] + 1)) - removed
    assert set(index.ids().tolist()) == expected and len(index) == len(expected)


def test_rebuild_keeps_ids_vectors_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    index = MemoryIndex(DIM, IndexParams(exact_threshold=1_000, min_nlist=8, nprobe=64))
    ids = np.arange(1, 2_501, dtype=np.int64)
    b = batch(ids, rng)
    for s in range(0, 2_500, 500):
        index.add(ids[s : s + 500], b.take(np.arange(s, s + 500)))
    assert index.kind == "ivf16"  # trained at the 1,000 threshold: 1,000 / 40 points per list -> 16
    np.testing.assert_allclose(index.reconstruct(ids[[0, 1_999]]), b.keys[[0, 1_999]], rtol=1e-6)
    out = index.search(b.keys[[3, 2_000]], 1)
    assert out.ids[:, 0].tolist() == [4, 2_001]
    assert out.users[:, 0].tolist() == ["u4", "u1"] and out.prefix_lens[:, 0].tolist() == [4, 6]
    index.save(tmp_path / "snap")
    loaded = MemoryIndex.load(tmp_path / "snap", index.params)
    assert loaded.kind == "ivf16" and set(loaded.ids().tolist()) == set(ids.tolist())
    assert loaded.remove(ids[:10]) == 10 and loaded.search(b.keys[:1], 5).ids[0, 0] != 1


def test_metadata_compaction_after_old_memories_leave() -> None:
    rng = np.random.default_rng(2)
    index = MemoryIndex(DIM, IndexParams(exact_threshold=100_000))
    ids = np.arange(1, 20_001, dtype=np.int64)
    b = batch(ids, rng)
    index.add(ids, b)
    assert index.remove(ids[:15_000]) == 15_000
    assert index.oldest(3).tolist() == [15_001, 15_002, 15_003]
    out = index.search(b.keys[[15_000, 19_999]], 1)
    assert out.ids[:, 0].tolist() == [15_001, 20_000]
    assert out.items[:, 0].tolist() == [150_010, 200_000] and out.timestamps[:, 0].tolist() == [
        15_001.0,
        20_000.0,
    ]


def test_add_is_idempotent_and_remove_ignores_absent_ids() -> None:
    rng = np.random.default_rng(3)
    index = MemoryIndex(DIM, IndexParams())
    ids = np.arange(1, 11, dtype=np.int64)
    b = batch(ids, rng)
    assert index.add(ids, b) == 10 and index.add(ids, b) == 0 and len(index) == 10
    assert index.remove(np.array([3, 3, 99])) == 1 and len(index) == 9


def test_choose_nlist_follows_size() -> None:
    params = IndexParams()
    assert choose_nlist(150_000, params) == 2_048
    assert choose_nlist(1_000_000, params) == 4_096
    assert choose_nlist(5_000_000, params) == 8_192
    assert choose_nlist(20_000, params) == 256  # a floor of min_nlist, capped by what 20k points can train


def test_search_uses_the_configured_threads_in_any_thread() -> None:
    """OpenMP keeps the thread count per thread: a search from a worker thread must still use the
    configured count, not every core (what it would inherit)."""
    rng = np.random.default_rng(0)
    ids = np.arange(1, 65)
    index = MemoryIndex(DIM, IndexParams(threads=1))
    index.add(ids, batch(ids, rng))
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    seen: list[tuple[int, int]] = []

    def worker() -> None:
        before = faiss.omp_get_max_threads()
        index.search(queries, 3)
        seen.append((before, faiss.omp_get_max_threads()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    before, after = seen[0]
    assert after == 1
    if (os.cpu_count() or 1) > 1:  # the point: a fresh thread would otherwise use every core
        assert before > 1
    with pytest.raises(ValueError, match="threads"):
        IndexParams(threads=0)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    q = rng.standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@contextmanager
def writer_holding(index: MemoryIndex) -> Iterator[Callable[[], None]]:
    """A thread holds the index's write lock inside the block until the yielded function releases it
    (at the latest when the block ends)."""
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with index.lock.write():
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert held.wait(5)
    try:
        yield release.set
    finally:
        release.set()
        t.join()


def test_try_search_answers_when_free_and_refuses_at_once_while_a_writer_holds_the_lock() -> None:
    index = MemoryIndex(DIM, IndexParams())
    rng = np.random.default_rng(3)
    ids = np.arange(1, 101, dtype=np.int64)
    index.add(ids, batch(ids, rng))
    q = _unit(rng, 4)
    free = index.try_search(q, 5)
    assert free is not None
    np.testing.assert_array_equal(free.ids, index.search(q, 5).ids)
    with writer_holding(index) as release:
        t0 = time.perf_counter()
        assert index.try_search(q, 5) is None
        assert time.perf_counter() - t0 < 0.05  # refused at once, not after the writer
        release()
    after = index.try_search(q, 5)  # the refusal left no reader count behind: a writer can still enter
    assert after is not None
    index.add(np.array([101], np.int64), batch(np.array([101], np.int64), rng))
    assert len(index) == 101


async def test_search_now_waits_for_a_writer_off_the_event_loop() -> None:
    """While a writer holds the index, a coroutine's search waits in a worker thread: the loop keeps
    running other tasks, and the answer comes once the writer is done."""
    index = MemoryIndex(DIM, IndexParams())
    rng = np.random.default_rng(4)
    ids = np.arange(1, 51, dtype=np.int64)
    index.add(ids, batch(ids, rng))
    q = _unit(rng, 2)
    expected = index.search(q, 3).ids
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    with writer_holding(index) as release:
        tick_task = asyncio.create_task(ticker())
        search = asyncio.create_task(search_now(index, q, 3))
        await asyncio.sleep(0.2)
        assert not search.done() and ticks >= 5  # blocked on the writer, yet the loop ran on
        release()
        result = await asyncio.wait_for(search, 5)
        tick_task.cancel()
    np.testing.assert_array_equal(result.ids, expected)


def test_transition_rows_are_built_by_writes_not_reads() -> None:
    """Reads only look rows up (the request path never builds one); a write rebuilds exactly the rows
    it touched, and a failed removal changes no row."""
    table = TransitionTable()
    recent = np.array([[1, 2, 0, 0, 0], [1, 0, 0, 0, 0]])
    table.add(np.array([5, 6]), recent)  # 1 → 5 at lag 1, 2 → 5 at lag 2, 1 → 6 at lag 1
    one, two = table.followers(1), table.followers(2)
    assert (one.items.tolist(), one.lags.tolist(), one.counts.tolist()) == ([5, 6], [1, 1], [1, 1])
    assert (two.items.tolist(), two.lags.tolist()) == ([5], [2])
    assert table.followers(1) is one  # the same object: nothing rebuilt on read
    table.add(np.array([6]), np.array([[1, 0, 0, 0, 0]]))
    assert table.followers(1).counts.tolist() == [1, 2] and table.followers(2) is two  # row 2 untouched
    with pytest.raises(ValueError, match="negative"):
        table.remove(np.array([5, 7]), np.array([[1, 0, 0, 0, 0], [3, 0, 0, 0, 0]]))  # 3 → 7 never added
    assert table.followers(1).counts.tolist() == [1, 2] and table.followers(3).items.size == 0
    assert len(table) == 3  # 1 → 5, 1 → 6 at lag 1 and 2 → 5 at lag 2
    table.remove(np.array([5, 6]), np.array([[1, 2, 0, 0, 0], [1, 0, 0, 0, 0]]))
    assert table.followers(1).counts.tolist() == [1] and table.followers(2).items.size == 0
    assert not table.followers(1).counts.flags.writeable  # rows are shared with every reader


# ------------------------------------------------------------------------------------- index kinds

KINDS = ("ivf_flat", "ivf_fp16", "ivf_sq8")


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors around ``centres`` (c, DIM): encoder states cluster by taste, as these do."""
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def kind_batch(ids: np.ndarray, keys: np.ndarray) -> MemoryBatch:
    """Memories with known metadata: item 10·id, user u{id % 5}, timestamp id, two prefix items."""
    recent = np.stack([ids % 13 + 1, ids % 11], axis=1)
    return MemoryBatch.create(
        keys, ids * 10, [f"u{i % 5}" for i in ids.tolist()], ids.astype(np.float64), ids % 7, DIM, recent, 2
    )


def filled(
    kind: str, n: int, seed: int = 0, chunk: int = 1_000
) -> tuple[MemoryIndex, np.ndarray, np.ndarray]:
    """An index of ``kind`` grown chunk by chunk to ``n`` clustered memories (ids 1..n): it turns IVF at
    2,000 and regrows at 4,000, 8,000, ... (regrow_factor 2). Returns it, the keys and the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((300, DIM)).astype(np.float32)
    keys = clustered(rng, n, centres)
    params = IndexParams(kind=kind, exact_threshold=2_000, min_nlist=16, nprobe=16, regrow_factor=2.0)  # type: ignore[arg-type]
    index = MemoryIndex(DIM, params, recent_width=2)
    ids = np.arange(1, n + 1, dtype=np.int64)
    for s in range(0, n, chunk):
        index.add(ids[s : s + chunk], kind_batch(ids[s : s + chunk], keys[s : s + chunk]))
    return index, keys, centres


def recall_at(found: np.ndarray, keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k (inner product over ``keys`` held under ``ids``) that ``found`` holds."""
    exact = ids[np.argsort(-(queries @ keys.T), axis=1)[:, :k]]
    return float(
        np.mean([len(set(f) & set(e)) / k for f, e in zip(found.tolist(), exact.tolist(), strict=True)])
    )


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_finds_near_neighbours_with_their_metadata_and_keys(kind: str) -> None:
    index, keys, centres = filled(kind, 12_000)
    assert index.kind == {"ivf_flat": "ivf128", "ivf_fp16": "ivf128-fp16", "ivf_sq8": "ivf128-sq8"}[kind]
    queries = clustered(np.random.default_rng(9), 200, centres)
    out = index.search(queries, 10, with_keys=True)
    assert recall_at(out.ids, keys, np.arange(1, 12_001), queries, 10) >= {"ivf_sq8": 0.9}.get(kind, 0.97)
    assert (out.items == out.ids * 10).all() and (out.timestamps == out.ids).all()
    assert out.keys is not None  # the stored codes, decoded: within a code's step of the keys written
    error = np.abs(out.keys - keys[out.ids - 1]).max()
    assert error <= {"ivf_flat": 1e-6, "ivf_fp16": 1e-3, "ivf_sq8": 0.05}[kind]
    np.testing.assert_allclose(index.reconstruct(np.array([5, 11_999])), keys[[4, 11_998]], atol=0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_removes_by_id_from_its_lists_only(kind: str) -> None:
    index, keys, _ = filled(kind, 6_000)
    gone = np.arange(1, 6_001, 3, dtype=np.int64)
    assert index.remove(gone) == gone.size and index.remove(gone[:5]) == 0
    assert len(index) == 4_000 and set(index.ids().tolist()) == set(range(1, 6_001)) - set(gone.tolist())
    out = index.search(keys[gone - 1][:300], 5)
    assert not set(out.ids.ravel().tolist()) & set(gone.tolist())
    kept = np.array([2, 3, 5_999], np.int64)
    assert (index.search(keys[kept - 1], 1).ids[:, 0] == kept).all()  # each finds itself still


@pytest.mark.parametrize("kind", ("ivf_fp16", "ivf_sq8"))
def test_regrow_moves_compressed_codes_bit_for_bit(kind: str) -> None:
    """Codes are of the vectors, not of their residuals: a regrow to more lists keeps every code (a
    memory decodes to the same vector before and after), so nothing is quantised twice."""
    index, keys, centres = filled(kind, 3_000)
    assert index.kind == f"ivf32-{kind[4:]}"
    ids = np.arange(1, 3_001, dtype=np.int64)
    before = index.reconstruct(ids)
    more = np.arange(3_001, 13_001, dtype=np.int64)
    extra = clustered(np.random.default_rng(5), more.size, centres)
    for s in range(0, more.size, 2_500):
        index.add(more[s : s + 2_500], kind_batch(more[s : s + 2_500], extra[s : s + 2_500]))
    assert index.kind == f"ivf256-{kind[4:]}"  # regrown at 5,500 and at 13,000 memories
    np.testing.assert_array_equal(index.reconstruct(ids), before)
    queries = clustered(np.random.default_rng(6), 200, centres)
    everything = np.concatenate([keys, extra])
    found = index.search(queries, 10).ids
    assert recall_at(found, everything, np.arange(1, 13_001), queries, 10) >= 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_survives_a_snapshot(kind: str, tmp_path: Path) -> None:
    index, keys, centres = filled(kind, 6_000)
    index.remove(np.arange(1, 101, dtype=np.int64))
    queries = clustered(np.random.default_rng(7), 50, centres)
    before = index.search(queries, 10, with_keys=True)
    index.save(tmp_path / "snap")
    loaded = MemoryIndex.load(tmp_path / "snap", index.params, recent_width=2)
    assert loaded.kind == index.kind and loaded.conforms and len(loaded) == 5_900
    after = loaded.search(queries, 10, with_keys=True)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.keys, before.keys)
    assert loaded.followers([1])[0].counts.sum() == index.followers([1])[0].counts.sum()
    assert loaded.remove(before.ids[:, 0]) == np.unique(before.ids[:, 0]).size  # lists known again
    ids = np.arange(6_001, 6_101, dtype=np.int64)
    loaded.add(ids, kind_batch(ids, keys[:100]))
    found = loaded.search(keys[:3], 5).ids  # ids 1..3 were removed: their copies are found instead
    assert all(6_001 + j in found[j] for j in range(3))


def test_auto_switches_to_sq8_at_the_first_rebuild_from_compress_from() -> None:
    """The default kind: ivf_flat while small, ivf_sq8 once a rebuild happens at ``compress_from``
    memories or more, its codes encoded from the float32 vectors (a lossless source)."""
    params = IndexParams(
        exact_threshold=2_000, compress_from=5_000, min_nlist=16, nprobe=16, regrow_factor=2.0
    )
    assert (
        params.kind == "auto" and params.kind_for(4_999) == "ivf_flat" and params.kind_for(5_000) == "ivf_sq8"
    )
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((300, DIM)).astype(np.float32)
    keys = clustered(rng, 9_000, centres)
    index = MemoryIndex(DIM, params, recent_width=2)
    ids = np.arange(1, 9_001, dtype=np.int64)
    kinds = []
    for s in range(0, 9_000, 1_500):
        index.add(ids[s : s + 1_500], kind_batch(ids[s : s + 1_500], keys[s : s + 1_500]))
        kinds.append(index.kind)
    # IVF at 3,000 (flat below compress_from), rebuilt at 6,000 as SQ8; 9,000 is short of the next regrow
    assert kinds == ["flat", "ivf64", "ivf64", "ivf128-sq8", "ivf128-sq8", "ivf128-sq8"]
    assert index.conforms and np.abs(index.reconstruct(ids[:100]) - keys[:100]).max() < 0.05
    queries = clustered(np.random.default_rng(12), 200, centres)
    assert recall_at(index.search(queries, 10).ids, keys, ids, queries, 10) >= 0.9


def test_a_snapshot_of_another_kind_is_read_and_converted(tmp_path: Path) -> None:
    index, keys, centres = filled("ivf_flat", 5_000)
    index.save(tmp_path / "snap")
    params = replace(index.params, kind="ivf_sq8")
    loaded = MemoryIndex.load(tmp_path / "snap", params, recent_width=2)
    assert loaded.kind == "ivf64" and not loaded.conforms  # as written, until converted
    assert loaded.conform() is loaded and loaded.kind == "ivf64-sq8" and loaded.conforms
    queries = clustered(np.random.default_rng(8), 100, centres)
    assert recall_at(loaded.search(queries, 10).ids, keys, np.arange(1, 5_001), queries, 10) >= 0.9


def test_a_snapshot_of_the_previous_format_is_read(tmp_path: Path) -> None:
    """Written before the lists column and narrow columns: an IVF-Flat index with a hashtable direct
    map, int64 item and prefix-item columns."""
    rng = np.random.default_rng(10)
    keys = _unit(rng, 3_000)
    ids = np.arange(1, 3_001, dtype=np.int64)
    old = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 16, faiss.METRIC_INNER_PRODUCT)
    old.train(keys)
    old.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    old.add_with_ids(keys, ids)
    size = 4_096
    columns = {
        "base": np.array([1], np.int64),
        "alive": np.zeros(size, bool),
        "item": np.zeros(size, np.int64),
    }
    columns |= {"user": np.zeros(size, np.int32), "ts": np.zeros(size), "plen": np.zeros(size, np.int32)}
    columns["recent"] = np.zeros((size, 2), np.int64)
    columns["alive"][:3_000], columns["item"][:3_000] = True, ids * 10
    columns["recent"][:3_000, 0] = ids % 13 + 1
    IndexImage(old, columns, ["u0"], {"dim": DIM, "nlist": 16, "trained_for": 3_000}).write(tmp_path / "old")
    loaded = MemoryIndex.load(tmp_path / "old", IndexParams(nprobe=16), recent_width=2)
    assert loaded.kind == "ivf16" and len(loaded) == 3_000
    out = loaded.search(keys[:20], 1)
    assert (out.ids[:, 0] == ids[:20]).all() and (out.items[:, 0] == ids[:20] * 10).all()
    assert loaded.remove(ids[:10]) == 10 and loaded.search(keys[:1], 1).ids[0, 0] != 1
    assert loaded.followers([1])[0].counts.sum() == (ids[10:] % 13 + 1 == 1).sum()
    more = np.arange(3_001, 3_011, dtype=np.int64)
    loaded.add(more, kind_batch(more, keys[:10]))
    assert loaded.remove(more) == 10 and len(loaded) == 2_990


def test_ids_below_the_base_are_added_after_the_oldest_left() -> None:
    """Slot groups number memories ``seq * G + g``: a group that wrote little adds ids below those that
    already left the others, after the columns moved their base past them."""
    rng = np.random.default_rng(5)
    index = MemoryIndex(DIM, IndexParams(exact_threshold=100_000), recent_width=0)
    index.add(np.arange(1, 10_001), batch(np.arange(1, 10_001), rng))
    index.remove(np.arange(1, 9_001))  # the oldest leave: the columns move their base up
    late = np.array([40, 41], np.int64)  # a lagging group's next ids
    late_batch = batch(late, rng)
    assert index.add(late, late_batch) == 2
    assert len(index) == 1_002 and index.contains(late).all()
    found = index.search(late_batch.keys, 1)
    assert found.ids[:, 0].tolist() == [40, 41]
    assert index.remove(late) == 2 and len(index) == 1_000
