"""The memory index at 1M and 10M memories: bytes, build and restart time, latency, recall and the
accuracy the user gets, per index kind (``IndexParams.kind``).

    python -m bench.index_scale --model artifacts/beauty --sizes 1m 10m

Memories: the model's own bank (its real training and validation memories), then memories of random
walks over the dataset's item transitions, each starting at a real user's prefix and encoded by the
model's own encoder (bench.walks), up to each size. Queries: the encoder states of the dataset's test
users, as the service encodes them. Every kind is built into the service's index
(``memory_store.index.MemoryIndex``, one FAISS thread as the service sets it) from empty, in chunks of
``CHUNK`` memories: the flat → IVF switch and the regrows a bulk load goes through. Then per kind:

* bytes per memory: the snapshot's files (the FAISS index, the metadata columns, the user names) plus
  the transition table's arrays (rebuilt from the columns at load, never written); the RSS growth of
  the build; the RSS of a fresh process that loads the snapshot, a replica's restart (and its seconds);
* per nprobe: search p50/p99 of one query and of a micro-batch of the service's ``batch_max_size``,
  each for the plan's fetch depth with the keys (as the service searches), and recall@20 against exact
  search (a hit is any memory scoring at least the exact 20th: ties count);
* served test HR@10 / NDCG@10 and agreement with exact search through the service's model path
  (bench.ann), for the kinds at ``--served-nprobes``; for compressed kinds also with the written keys
  put back in the answers (what the keys' quantisation alone costs).

Redis holds the full float32 keys whatever the kind: its bytes per memory come from ``MEMORY USAGE``
of a sample of memory hashes, their share of the log stream and of the per-user lists, written through
the store. Writes reports/index_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import redis
import torch

from bench import ann
from bench.common import write_report
from bench.walks import TransitionWalker, walk_memories
from memory_store import IndexParams, MemoryBatch, SearchResult, StoreConfig, open_store
from memory_store.config import INDEX_KINDS
from memory_store.index import MemoryIndex
from memory_store.ivf import release_freed_memory
from memory_store.redis_store import layout
from memory_store.transitions import Followers
from model import artifact
from model.data import leave_one_out, load_dataset
from model.memory import l2_normalise
from model.predictor import Plan, Predictor
from model.transitions import MAX_ORDER
from service.recommender import serving_predictor
from service.settings import Settings

log = logging.getLogger("bench.index_scale")

SIZES = {"100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}
CHUNK = 100_000  # memories per add while building
MICRO_BATCH = int(Settings.model_fields["batch_max_size"].default)  # the service's micro-batch
NPROBE_DEFAULT = int(Settings.model_fields["nprobe"].default)
RECALL_QUERIES = 2_000
LATENCY_QUERIES = 1_000
WARMUP = 100
REDIS_SAMPLE = 20_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE"))


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ------------------------------------------------------------------------------------------- memories


@dataclass
class Memories:
    """Up to n memories, ids 1..n in this order: unit keys (n, D) float32, items (n,) int32, user codes
    (n,) int32 into ``names``, prefix lengths (n,) int32 and prefix items (n, MAX_ORDER) int32."""

    keys: np.ndarray
    items: np.ndarray
    user: np.ndarray
    plens: np.ndarray
    recent: np.ndarray
    names: np.ndarray  # (users,) object: user ids
    bank: int  # the first ``bank`` are the model's own memories

    def batch(self, s: int, e: int) -> MemoryBatch:
        return MemoryBatch(
            keys=self.keys[s:e],
            items=self.items[s:e].astype(np.int64),
            users=tuple(self.names[self.user[s:e]]),
            timestamps=np.zeros(e - s),
            prefix_lens=self.plens[s:e],
            recent=self.recent[s:e].astype(np.int64),
        )


def assemble(art: artifact.Artifact, walker: TransitionWalker, n: int) -> Memories:
    """The bank's memories, then walk memories, n in all."""
    bank = art.bank
    assert bank is not None and bank.recent is not None, "the model directory holds no memory bank"
    b = len(bank)
    mem = Memories(
        keys=np.empty((n, art.encoder.cfg.dim), np.float32),
        items=np.empty(n, np.int32),
        user=np.empty(n, np.int32),
        plens=np.empty(n, np.int32),
        recent=np.empty((n, MAX_ORDER), np.int32),
        names=np.empty(0, object),
        bank=b,
    )
    mem.keys[:b], mem.items[:b], mem.user[:b] = bank.unit_keys, bank.items, bank.users
    mem.plens[:b], mem.recent[:b] = bank.prefix_lens, bank.recent
    at, walks = b, 0
    t0 = time.perf_counter()
    for chunk in walk_memories(art.encoder, walker, n - b):
        m = min(len(chunk), n - at)
        mem.keys[at : at + m] = l2_normalise(chunk.keys[:m])
        mem.items[at : at + m], mem.plens[at : at + m] = chunk.items[:m], chunk.prefix_lens[:m]
        mem.recent[at : at + m], mem.user[at : at + m] = (
            chunk.recent[:m],
            len(art.vocab.users) + chunk.walk[:m],
        )
        at, walks = at + m, int(chunk.walk[m - 1]) + 1
    mem.names = np.array(list(art.vocab.users) + [f"walk-{j}" for j in range(walks)], dtype=object)
    log.info("%d memories (%d of the bank, %d walks) in %.0f s", n, b, walks, time.perf_counter() - t0)
    return mem


# -------------------------------------------------------------------------------- indexes to compare


class ExactSearch:
    """Exact inner-product search over the first n memories (the reference), with the follower rows of
    an index holding the same memories. The answers to ``queries`` are computed at once (FAISS scans
    by matrix products only for many queries at a time) and handed out in order: each search must ask
    for the next rows of ``queries``, as bench.ann's answers do."""

    def __init__(self, mem: Memories, n: int, rows: MemoryIndex, queries: np.ndarray, k: int) -> None:
        self.mem, self.rows, self.queries, self.k = mem, rows, queries, k
        self.scores, self.found = faiss.knn(queries, mem.keys[:n], k, metric=faiss.METRIC_INNER_PRODUCT)
        self.at = 0

    def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        span = slice(self.at, self.at + queries.shape[0])
        if k > self.k or not np.array_equal(queries, self.queries[span]):
            raise ValueError("exact answers are handed out in the order of the queries given")
        self.at = span.stop
        scores, rows = self.scores[span, :k], self.found[span, :k]
        valid, at = rows >= 0, np.maximum(rows, 0)
        keys = np.where(valid[..., None], self.mem.keys[at], 0.0).astype(np.float32) if with_keys else None
        return SearchResult(
            ids=np.where(valid, rows + 1, -1),
            scores=np.where(valid, scores, -np.inf).astype(np.float32),
            items=np.where(valid, self.mem.items[at], 0).astype(np.int64),
            users=np.where(valid, self.mem.names[self.mem.user[at]], ""),
            prefix_lens=np.where(valid, self.mem.plens[at], -1).astype(np.int32),
            timestamps=np.where(valid, 0.0, np.nan),
            keys=keys,
        )

    def followers(self, items: Sequence[int]) -> list[Followers]:
        return self.rows.followers(items)


class WrittenKeys:
    """An index's search with the keys as written put back in its answers: what the quantisation of the
    keys alone costs the fusion, apart from the neighbours found."""

    def __init__(self, index: MemoryIndex, mem: Memories) -> None:
        self.index, self.mem = index, mem

    def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult:
        found = self.index.search(queries, k, with_keys)
        if not with_keys:
            return found
        keys = np.where((found.ids >= 0)[..., None], self.mem.keys[np.maximum(found.ids - 1, 0)], 0.0)
        return replace(found, keys=keys.astype(np.float32))

    def followers(self, items: Sequence[int]) -> list[Followers]:
        return self.index.followers(items)


def build(mem: Memories, n: int, kind: str, dim: int) -> tuple[MemoryIndex, float, float]:
    """The service's index of ``kind`` grown to n memories; (index, seconds, RSS growth in bytes)."""
    params = IndexParams(kind=kind, nprobe=NPROBE_DEFAULT, threads=1)  # type: ignore[arg-type]
    release_freed_memory()
    rss0, t0 = rss_bytes(), time.perf_counter()
    index = MemoryIndex(dim, params, recent_width=MAX_ORDER)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        index.add(np.arange(s + 1, e + 1, dtype=np.int64), mem.batch(s, e))
    seconds = time.perf_counter() - t0
    release_freed_memory()
    log.info("%s: %d memories in %.0f s (%s)", kind, n, seconds, index.kind)
    return index, seconds, float(rss_bytes() - rss0)


# ------------------------------------------------------------------------------------------ measures


def recall_at_20(
    index: MemoryIndex, queries: np.ndarray, truth: tuple[np.ndarray, np.ndarray], keys: np.ndarray
) -> float:
    """Share of the top 20 found that score at least the exact 20th (ties count as hits)."""
    found = index.search(queries, 20).ids
    exact_scores = np.einsum("qd,qkd->qk", queries, keys[np.maximum(found - 1, 0)])
    hits = (found >= 0) & (exact_scores >= truth[0][:, 19:20] - 1e-6)
    return float(hits.mean())


def latencies(index: MemoryIndex, queries: np.ndarray, fetch: int, batch: int) -> dict[str, float]:
    """p50/p99 ms of searches of ``batch`` queries each, ``fetch`` deep with keys (as served)."""
    warm, timed = max(1, WARMUP // batch), LATENCY_QUERIES if batch == 1 else 200
    calls = [queries[s : s + batch] for s in range(0, queries.shape[0] - batch + 1, batch)]
    for q in calls[:warm]:
        index.search(q, fetch, with_keys=True)
    lat = []
    for q in calls[warm : warm + timed]:
        t0 = time.perf_counter()
        index.search(q, fetch, with_keys=True)
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


@dataclass
class Served:
    """What the served comparison needs: the predictor, the test users' plan, masks, targets and the
    exact answers (tops, fused ids) once computed."""

    predictor: Predictor
    plan: Plan
    masks: list[np.ndarray]
    targets: np.ndarray
    unit: np.ndarray  # (U, D) the plan's states, normalised: the search queries
    ref: tuple[np.ndarray, np.ndarray] | None = None


def served(s: Served, index: ann.Searchable) -> dict[str, float]:
    tops, ids, search_s = ann.answer(s.predictor, index, s.plan, s.masks)
    out = {**ann.accuracy(tops, s.targets), "search_ms_per_query": search_s * 1e3}
    if s.ref is not None:
        out |= ann.compare(tops, ids, *s.ref)
    log.info("served: %s", {k: round(v, 4) for k, v in out.items()})
    return out


def exact_served(s: Served, mem: Memories, n: int, rows: MemoryIndex) -> dict[str, float]:
    t0 = time.perf_counter()
    exact = ExactSearch(mem, n, rows, s.unit, s.plan.fetch)
    search_s = time.perf_counter() - t0
    tops, ids, _ = ann.answer(s.predictor, exact, s.plan, s.masks)
    s.ref = (tops, ids)
    out = {**ann.accuracy(tops, s.targets), "search_ms_per_query": search_s * 1e3 / len(s.masks)}
    log.info("exact: %s", out)
    return out


def snapshot_bytes(index: MemoryIndex, directory: Path) -> dict[str, float]:
    """Bytes of the snapshot's files by part, and the transition table's arrays."""
    index.save(directory)
    sizes = {
        "index": (directory / "index.faiss").stat().st_size,
        "columns": (directory / "meta.npz").stat().st_size,
        "users": (directory / "users.json").stat().st_size,
        "transitions": index.footprint()["transitions"],
    }
    return {k: float(v) for k, v in sizes.items()}


def restart(directory: Path, kind: str) -> dict[str, float]:
    """Load the snapshot in a fresh process (a replica's restart): seconds and RSS growth."""
    cmd = [sys.executable, "-m", "bench.index_scale", "--restart-probe", str(directory), "--kinds", kind]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def restart_probe(directory: Path, kind: str) -> None:
    """The child of :func:`restart`: prints {"seconds", "rss_bytes", "memories"} as one JSON line."""
    faiss.omp_set_num_threads(1)
    rss0, t0 = rss_bytes(), time.perf_counter()
    index = MemoryIndex.load(directory, IndexParams(kind=kind, threads=1), recent_width=MAX_ORDER)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    sys.stdout.write(
        json.dumps({"seconds": seconds, "rss_bytes": rss_bytes() - rss0, "memories": len(index)}) + "\n"
    )


# ------------------------------------------------------------------------------------------ one size


def measure_kind(
    index: MemoryIndex,
    s: Served,
    mem: Memories,
    n: int,
    truth: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Recall and latency per nprobe, and the served accuracy at ``--served-nprobes``."""
    fetch = max(s.plan.fetch, 20)
    queries = s.unit[:RECALL_QUERIES]
    out: dict[str, Any] = {}
    for nprobe in args.nprobes:
        index.set_nprobe(nprobe)
        row: dict[str, Any] = {"recall@20": recall_at_20(index, queries, truth, mem.keys[:n])}
        row["batch1"] = latencies(index, s.unit, fetch, 1)
        row[f"batch{MICRO_BATCH}"] = latencies(index, s.unit, fetch, MICRO_BATCH)
        if nprobe in args.served_nprobes:
            row["served"] = served(s, index)
            if index.params.kind != "ivf_flat" and nprobe == NPROBE_DEFAULT:
                row["served_written_keys"] = served(s, WrittenKeys(index, mem))
        log.info("%s nprobe %d: %s", index.kind, nprobe, {k: v for k, v in row.items() if k != "served"})
        out[str(nprobe)] = row
    index.set_nprobe(NPROBE_DEFAULT)
    return out


def run_size(size: str, mem: Memories, s: Served, args: argparse.Namespace, dim: int) -> dict[str, Any]:
    n = SIZES[size]
    t0 = time.perf_counter()
    truth = faiss.knn(s.unit[:RECALL_QUERIES], mem.keys[:n], 20, metric=faiss.METRIC_INNER_PRODUCT)
    log.info("%s: exact top-20 of %d queries in %.0f s", size, RECALL_QUERIES, time.perf_counter() - t0)
    result: dict[str, Any] = {"memories": n, "kinds": {}}
    s.ref = None
    for kind in args.kinds:
        index, build_s, rss_growth = build(mem, n, kind, dim)
        if s.ref is None:
            result["exact"] = exact_served(s, mem, n, index)
        row: dict[str, Any] = {"index_kind": index.kind, "build_s": build_s, "build_rss_bytes": rss_growth}
        row["nprobe"] = measure_kind(index, s, mem, n, truth, args)
        with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
            row["bytes"] = snapshot_bytes(index, Path(tmp) / "snap")
            del index
            gc.collect()
            release_freed_memory()
            row["restart"] = restart(Path(tmp) / "snap", kind)
        log.info("%s %s: %s", size, kind, {k: row[k] for k in ("index_kind", "build_s", "bytes", "restart")})
        result["kinds"][kind] = row
    return result


# ---------------------------------------------------------------------------------------------- redis


async def redis_bytes(url: str, mem: Memories, dim: int) -> dict[str, float]:
    """Bytes per memory in Redis, written through the store: the memory hash, its share of the log
    stream and of the per-user id lists (MEMORY USAGE, exact: SAMPLES 0)."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    config = StoreConfig(dim=dim, namespace="bench-index-scale", redis_url=url, recent_width=MAX_ORDER)
    store = await open_store(config)
    try:
        for s in range(0, REDIS_SAMPLE, 1_000):
            await store.add_memories(mem.batch(mem.bank + s, mem.bank + s + 1_000))  # walk memories
    finally:
        await store.close()
    p = layout.key_prefix(config.namespace)
    ids = np.random.default_rng(0).choice(np.arange(1, REDIS_SAMPLE + 1), 1_000, replace=False)
    hashes = [int(client.memory_usage(p + layout.MEM + str(i), samples=0) or 0) for i in ids]
    lists = sum(
        int(client.memory_usage(k, samples=0) or 0) for k in client.scan_iter(p + layout.BY_USER + "*")
    )
    stream = int(client.memory_usage(p + layout.LOG, samples=0) or 0)
    client.flushdb()
    client.close()
    out = {"hash": float(np.mean(hashes)), "log": stream / REDIS_SAMPLE, "user_lists": lists / REDIS_SAMPLE}
    log.info("redis bytes per memory: %s", out)
    return out


# ----------------------------------------------------------------------------------------- candidates


def candidates(
    mem: Memories, n: int, s: Served, nlist: int, truth: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Codecs considered and not offered, in plain FAISS over the same memories and queries: IVF-PQ
    (residual, 8-bit sub-quantisers) and 6- and 4-bit scalar quantisation; recall@20 at nprobe 16."""
    keys, queries = mem.keys[:n], s.unit[:RECALL_QUERIES]
    sample = keys[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
    made: dict[str, faiss.IndexIVF] = {
        "ivf_pq16": faiss.IndexIVFPQ(
            faiss.IndexFlatIP(keys.shape[1]), keys.shape[1], nlist, 16, 8, faiss.METRIC_INNER_PRODUCT
        ),
        "ivf_pq32": faiss.IndexIVFPQ(
            faiss.IndexFlatIP(keys.shape[1]), keys.shape[1], nlist, 32, 8, faiss.METRIC_INNER_PRODUCT
        ),
    }
    for name, qt in (("ivf_sq6", faiss.ScalarQuantizer.QT_6bit), ("ivf_sq4", faiss.ScalarQuantizer.QT_4bit)):
        made[name] = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(keys.shape[1]), keys.shape[1], nlist, qt, faiss.METRIC_INNER_PRODUCT, False
        )
    out: dict[str, Any] = {}
    for name, index in made.items():
        index.train(sample)
        index.add(keys)
        index.nprobe = NPROBE_DEFAULT
        found = index.search(queries, 20)[1] + 1
        exact_scores = np.einsum("qd,qkd->qk", queries, keys[np.maximum(found - 1, 0)])
        recall = float(((found > 0) & (exact_scores >= truth[0][:, 19:20] - 1e-6)).mean())
        out[name] = {"code_bytes": int(index.code_size), "recall@20": recall}
        log.info("candidate %s: %s", name, out[name])
        del index
    return out


# --------------------------------------------------------------------------------------------- report


def fmt_bytes(row: dict[str, Any], n: int) -> tuple[float, float, float]:
    """(index + metadata bytes per memory from the snapshot, of which index, RSS of a restart)."""
    b = row["bytes"]
    total = (b["index"] + b["columns"] + b["users"] + b["transitions"]) / n
    return total, b["index"] / n, row["restart"]["rss_bytes"] / n


def must_reach(r: dict[str, Any]) -> list[str]:
    """The issue's targets at the largest size, per kind, at the service's nprobe."""
    size = max(r["sizes"], key=lambda z: r["sizes"][z]["memories"])
    v = r["sizes"][size]
    lines = [
        f"## Targets at {size} (nprobe {NPROBE_DEFAULT}, the service's default)",
        "",
        "| kind | bytes/memory <= 150 | restart RSS/memory <= 150 | search p99 (1 query) <= 5 ms | "
        "recall@20 >= 0.9 | NDCG@10 within 0.001 of exact | all met |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, row in v["kinds"].items():
        m = row["nprobe"].get(str(NPROBE_DEFAULT))
        if m is None or "served" not in m:
            continue
        total, _, rss = fmt_bytes(row, v["memories"])
        delta = m["served"]["ndcg@10"] - v["exact"]["ndcg@10"]
        p99 = m["batch1"]["p99_ms"]
        met = max(total, rss) <= 150 and p99 <= 5 and m["recall@20"] >= 0.9 and abs(delta) <= 0.001
        cells = [kind, f"{total:.0f}", f"{rss:.0f}", f"{p99:.2f}", f"{m['recall@20']:.3f}", f"{delta:+.4f}"]
        lines.append("| " + " | ".join([*cells, "yes" if met else "no"]) + " |")
    lines.append(
        "\nBytes and restart RSS judge the replica as it restarts; grown by writes (the build RSS column "
        "above) it holds a little more: "
        + ", ".join(f"{k} {row['build_rss_bytes'] / v['memories']:.0f}" for k, row in v["kinds"].items())
        + " bytes per memory."
    )
    return [*lines, ""]


METHOD = """## Method

- Bytes per memory: the snapshot's files (the FAISS index with its ids and centroids, the metadata
  columns, the user names) plus the transition table's arrays (rebuilt from the columns when a
  snapshot is read), over the memories. Restart RSS: the resident memory a fresh process gains by
  loading the snapshot, Python objects and allocator slack included. Build RSS: what the benchmark
  process gained by building the index, after handing freed heap pages back: what a replica grown by
  writes holds, which may include the inverted lists' spare capacity (a restart sizes them exactly).
- Build: the service's index from empty, 100,000 memories per add, so through the flat → IVF switch
  at 50,000 memories and the regrows at 4x; nlist follows the size the index was last trained at.
- Latency: 1,000 single-query searches and 200 searches of a micro-batch, after a warm-up, each
  `fetch` deep with the keys, as the service searches; one FAISS thread. A micro-batch costs about its
  size times one query: FAISS's IVF scan is per query.
- Recall@20: the top 20 found for 2,000 test users' states, a hit being a memory whose exact score is
  at least the exact 20th (duplicated walk states tie).
- Served: every test user answered through the service's model path with seen items masked; memory
  recall and top-10 agreement against the answers of exact search over the same memories; "written
  keys" puts the float32 keys back into a compressed index's answers, which isolates what the fusion
  loses to decoded keys from what it loses to the neighbours found.
"""


def kind_rows(kind: str, row: dict[str, Any], n: int, exact: dict[str, float]) -> list[str]:
    """One table row per nprobe of a kind."""
    total, index_b, rss = fmt_bytes(row, n)
    lines = []
    for nprobe, m in row["nprobe"].items():
        b1, bm = m["batch1"], m[f"batch{MICRO_BATCH}"]
        cells = [kind, row["index_kind"], nprobe, f"{total:.0f}", f"{index_b:.0f}", f"{rss:.0f}"]
        cells += [
            f"{row['build_rss_bytes'] / n:.0f}",
            f"{row['build_s']:.0f}",
            f"{row['restart']['seconds']:.1f}",
        ]
        cells += [f"{b1['p50_ms']:.3f} / {b1['p99_ms']:.3f}", f"{bm['p50_ms']:.2f} / {bm['p99_ms']:.2f}"]
        cells.append(f"{m['recall@20']:.3f}")
        sv = m.get("served")
        if sv:
            cells += [f"{sv['ndcg@10']:.4f}", f"{sv['ndcg@10'] - exact['ndcg@10']:+.4f}"]
            cells += [f"{sv['memory_recall']:.3f}", f"{sv['top10_identical']:.3f}"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def size_section(size: str, v: dict[str, Any]) -> list[str]:
    e = v["exact"]
    lines = [
        f"## {size} memories",
        "",
        f"Exact search: HR@10 {e['hr@10']:.4f}, NDCG@10 {e['ndcg@10']:.4f}.",
        "",
        "| kind | index | nprobe | bytes/memory | of which index | restart RSS/memory | build RSS/memory | "
        f"build s | restart s | p50 / p99 ms (1) | p50 / p99 ms ({MICRO_BATCH}) | recall@20 | NDCG@10 | "
        "Δ exact | memory recall | top-10 identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in v["kinds"].items():
        lines += kind_rows(kind, row, v["memories"], e)
    for kind, row in v["kinds"].items():
        for nprobe, m in row["nprobe"].items():
            w = m.get("served_written_keys")
            if w:
                lines.append(
                    f"\n{kind} at nprobe {nprobe} with the written keys put back in the answers: NDCG@10 "
                    f"{w['ndcg@10']:.4f} ({w['ndcg@10'] - e['ndcg@10']:+.4f} against exact)."
                )
    return [*lines, ""]


def redis_and_candidates(r: dict[str, Any]) -> list[str]:
    rb = r["redis"]
    lines = [
        "## Redis",
        "",
        f"Per memory, whatever the index kind (Redis holds the float32 keys): hash {rb['hash']:.0f} bytes, "
        f"log stream {rb['log']:.0f} (while the stream still holds the entry), per-user lists "
        f"{rb['user_lists']:.0f}: {rb['hash'] + rb['log'] + rb['user_lists']:.0f} bytes "
        f"({(rb['hash'] + rb['user_lists']) * 1e7 / 2**30:.1f} GiB of hashes and lists at 10M).",
        "",
    ]
    if r.get("candidates"):
        smallest = min(r["sizes"], key=lambda z: r["sizes"][z]["memories"])
        lines += [
            f"## Codecs considered ({smallest}, plain FAISS, not offered)",
            "",
            "| codec | code bytes | recall@20 (nprobe 16) |",
            "|---|---:|---:|",
        ]
        for name, c in r["candidates"].items():
            lines.append(f"| {name} | {c['code_bytes']} | {c['recall@20']:.3f} |")
        lines.append("")
    return lines


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# The memory index at scale",
        "",
        f"`{r['command']}` on {r['machine']}, {r['date']}; one FAISS and torch thread (as the service sets "
        f"them); {r['threads_note']}",
        "",
        f"Model `{r['model']}` (`{r['model_version']}`, {r['dataset']}): its bank of {r['bank']} memories, "
        f"then memories of walks over the dataset's item transitions from real users' prefixes, encoded by "
        f"its encoder (bench.walks), up to each size; dim {r['dim']}. Queries: the {r['users']} test users' "
        f"encoder states. Served: test HR@10 / NDCG@10 through the service's model path (bench.ann), fetch "
        f"{r['fetch']}, K = {r['k']}; agreement against exact search over the same memories.",
        "",
    ]
    for size, v in r["sizes"].items():
        lines += size_section(size, v)
    if "peak_rss_bytes" in r:
        peak = r["peak_rss_bytes"] / 2**30
        lines += [f"Peak RSS of the benchmark process: {peak:.1f} GiB. {r.get('peak_note', '')}".strip(), ""]
    return "\n".join([*lines, *redis_and_candidates(r), *must_reach(r), METHOD])


# ------------------------------------------------------------------------------------------------ run


def prepare(art: artifact.Artifact, args: argparse.Namespace) -> Served:
    predictor = serving_predictor(art)
    split = leave_one_out(load_dataset(args.dataset or art.dataset, args.data_dir))
    test = split.test
    rows = np.random.default_rng(args.seed).permutation(len(test))[: args.users]
    histories = [test.inputs[i, : test.lengths[i]].tolist() for i in rows]
    indptr, seen = split.test_seen
    masks = [np.unique(seen[indptr[i] : indptr[i + 1]]) for i in rows]
    plan = predictor.prepare(histories, [art.vocab.users[int(test.users[i])] for i in rows])
    return Served(predictor, plan, masks, test.targets[rows], l2_normalise(plan.states))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    art = artifact.load(args.model)
    s = prepare(art, args)
    dim = art.encoder.cfg.dim
    walker = TransitionWalker(load_dataset(args.dataset or art.dataset, args.data_dir), args.seed)
    mem = assemble(art, walker, max(SIZES[z] for z in args.sizes))
    result: dict[str, Any] = {
        "model": Path(args.model).name,
        "model_version": art.model_version,
        "dataset": art.dataset,
        "dim": dim,
        "bank": mem.bank,
        "users": len(s.masks),
        "fetch": s.plan.fetch,
        "k": s.predictor.cfg.k,
        "micro_batch": MICRO_BATCH,
        "threads_note": "the machine's other jobs shared its 2 cores.",
        "sizes": {},
    }
    result["redis"] = asyncio.run(redis_bytes(args.redis_url, mem, dim))
    for size in args.sizes:
        result["sizes"][size] = run_size(size, mem, s, args, dim)
        smallest = args.sizes[0]
        if size == smallest and args.candidates:
            n = SIZES[size]
            truth = faiss.knn(s.unit[:RECALL_QUERIES], mem.keys[:n], 20, metric=faiss.METRIC_INNER_PRODUCT)
            nlist = int(result["sizes"][size]["kinds"][args.kinds[0]]["index_kind"].split("-")[0][3:])
            result["candidates"] = candidates(mem, n, s, nlist, truth)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/beauty")
    p.add_argument("--sizes", nargs="+", default=["1m", "10m"], choices=list(SIZES))
    p.add_argument("--kinds", nargs="+", default=list(INDEX_KINDS), choices=list(INDEX_KINDS))
    p.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--served-nprobes", type=int, nargs="+", default=[16])
    p.add_argument("--users", type=int, default=None, help="test users (default: all)")
    p.add_argument("--no-candidates", dest="candidates", action="store_false")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    p.add_argument("--tmp-dir", default=None, help="where the snapshots of the restart test go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default=None, help="dataset name or file (default: the model's)")
    p.add_argument("--restart-probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.restart_probe is not None:
        restart_probe(args.restart_probe, args.kinds[0])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    write_report("index_scale", "bench.index_scale", argv, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
