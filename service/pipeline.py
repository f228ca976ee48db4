"""The recommend pipeline of ARCHITECTURE.md, pure of HTTP: history → encode → retrieve → adaptive K →
fuse → rank → mask → top-n. Concurrent requests are queued and served in micro-batches: one store read,
one encoder pass, one search and one fusion pass per batch. The benchmark drives it without a server.

The model work of a batch runs in the event-loop thread itself. A micro-batch costs a few milliseconds
of CPU that holds the GIL for most of it anyway; handing it to worker threads added a thread hop per
stage and, under load, GIL hand-offs that tripled each stage's wall time. Requests that arrive while a
batch computes wait in the socket buffers and form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from memory_store import MemoryStore, SearchResult
from model.finetune import limit_depth
from model.memory import Retrieved
from model.transitions import Shares
from service.errors import store_errors
from service.ingest import last_items
from service.metrics import Metrics
from service.recommender import IntArray, Recommender

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Query:
    """One recommend request in internal ids (validated by the caller)."""

    user_id: str
    n: int = 10
    history: tuple[int, ...] = ()  # appended to the stored history
    exclude_seen: bool = True
    exclude_items: tuple[int, ...] = ()
    explain: bool = False


@dataclass(frozen=True, slots=True)
class Memory:
    memory_id: int
    item: int
    user_id: str
    similarity: float
    prefix_len: int
    timestamp: float


@dataclass(frozen=True, slots=True)
class Answer:
    items: IntArray  # (≤ n,) internal item ids, best first
    scores: np.ndarray  # (≤ n,) float64
    k_used: int
    strategy: str  # "retrieval", "encoder" or "popular"
    memories: tuple[Memory, ...] = field(default=())
    degraded: bool = False  # the stored history could not be read


@dataclass
class _Pending:
    query: Query
    future: asyncio.Future[Answer]


class Pipeline:
    """Owns the micro-batching worker; :meth:`start` it inside a running loop, :meth:`stop` it at the end."""

    def __init__(
        self,
        recommender: Recommender,
        store: MemoryStore,
        metrics: Metrics,
        history_len: int = 50,
        mask_len: int = 200,
        max_batch: int = 64,
        max_wait_s: float = 0.001,
    ) -> None:
        self.recommender = recommender
        self.store = store
        self.metrics = metrics
        self.history_len = history_len  # items the encoder reads
        self.mask_len = max(mask_len, history_len)  # items exclude_seen removes (all the store keeps)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="recommend-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def recommend(self, query: Query) -> Answer:
        """Queue one request and wait for its batch."""
        if self._worker is None:
            raise RuntimeError("the pipeline is not started")
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(query, fut))
        return await fut

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            self.metrics.batch_size.observe(len(batch))
            try:
                answers = await self.run_batch([p.query for p in batch])
            except Exception as exc:  # handed to every waiting request; the route maps it to a status
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, a in zip(batch, answers, strict=True):
                if not p.future.done():
                    p.future.set_result(a)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.metrics.stage_latency.labels(name).observe(time.perf_counter() - t0)

    async def run_batch(self, queries: list[Query]) -> list[Answer]:
        """Answer a batch of queries in one pass (also usable directly, without the worker)."""
        degraded = False
        with self._stage("history"):
            try:
                stored = await self.store.histories([q.user_id for q in queries], self.mask_len)
            except store_errors() as exc:  # degrade: the request's own history and the local index
                log.warning("store unreachable, answering %d requests degraded: %s", len(queries), exc)
                self.metrics.degraded.inc(len(queries))
                stored, degraded = [[] for _ in queries], True
        seen = [[*s, *q.history] for s, q in zip(stored, queries, strict=True)]  # masked when asked
        histories = [h[-self.history_len :] for h in seen]  # encoded
        masks = [_mask(q, h) for q, h in zip(queries, seen, strict=True)]
        warm = [i for i, h in enumerate(histories) if h]
        answers: list[Answer | None] = [None] * len(queries)
        for i, q in enumerate(queries):
            if not histories[i]:
                items, scores = self.recommender.cold_start(masks[i], q.n)
                answers[i] = Answer(items, scores, 0, "popular")
        if warm:
            done = await self._warm(
                [queries[i] for i in warm], [histories[i] for i in warm], [masks[i] for i in warm]
            )
            for i, a in zip(warm, done, strict=True):
                answers[i] = a
        out = [replace(a, degraded=True) if degraded else a for a in answers if a is not None]
        for a in out:
            self.metrics.k_used.observe(a.k_used)
        return out

    async def _warm(
        self, queries: list[Query], histories: list[list[int]], masks: list[IntArray]
    ) -> list[Answer]:
        rec = self.recommender
        with self._stage("encode"):
            states, depths = rec.encode_with_depths(histories)  # (B, D), (B,)
        hits: SearchResult | None = None
        retrieved: Retrieved | None = None
        memories = voters = None
        if rec.retrieval and rec.k_max > 0:
            with self._stage("retrieve"):
                hits = await self.store.search(states, rec.fetch, with_keys=True)
                if rec.cross_user:
                    hits = others_only(hits, [q.user_id for q in queries], rec.depth)
                assert hits.keys is not None
                k = rec.k_max  # the fusion reads the nearest k (fewer with adaptive K); more may vote
                retrieved = limit_depth(Retrieved(hits.ids[:, :k], hits.scores[:, :k]), depths)
                memories = (
                    hits.keys[:, :k],
                    np.where(retrieved.ids >= 0, hits.items[:, :k], 0),
                    retrieved.scores,
                )
                if rec.vote.on:
                    v = rec.vote.depth
                    voters = (np.where(hits.ids[:, :v] >= 0, hits.items[:, :v], 0), hits.scores[:, :v])
        shares = None
        if rec.transitions.on:
            with self._stage("transitions"):
                shares = await self._shares(histories)
        with self._stage("fuse"):
            h = rec.fuse(states, *memories) if memories is not None else torch.from_numpy(states)
        with self._stage("rank"):
            ranked = rec.rank(h, masks, [q.n for q in queries], voters, shares)
        return [_answer(q, ranked[i], hits, retrieved, i, rec.retrieval) for i, q in enumerate(queries)]

    async def _shares(self, histories: list[list[int]]) -> Shares:
        """The transition channel's shares of the encoded histories, from the store's follower rows."""
        order = self.recommender.transitions.order
        recent = last_items(histories, order)  # (B, order), 0 = none
        wanted = np.unique(recent[recent > 0]).tolist()
        found = await self.store.followers(wanted)
        rows = {a: (f.items, f.lags, f.counts) for a, f in zip(wanted, found, strict=True)}
        return self.recommender.shares(recent, rows)


def others_only(hits: SearchResult, users: list[str], k: int) -> SearchResult:
    """Each row's memories of other users than its own, best first, cut to k (padded as the store pads):
    what `MemoryBank.search(own=False)` keeps offline."""
    keep = (hits.ids >= 0) & (hits.users != np.asarray(users, dtype=object)[:, None])  # (B, F)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # survivors first, in similarity order
    kept = np.take_along_axis(keep, order, axis=1)  # (B, k)

    def take(a: np.ndarray, pad: object) -> np.ndarray:
        return np.where(kept, np.take_along_axis(a, order, axis=1), np.asarray(pad, dtype=a.dtype))

    keys = None
    if hits.keys is not None:
        keys = np.take_along_axis(hits.keys, order[:, :, None], axis=1) * kept[:, :, None]
    return SearchResult(
        ids=take(hits.ids, -1),
        scores=take(hits.scores, -np.inf),
        items=take(hits.items, 0),
        users=take(hits.users, ""),
        prefix_lens=take(hits.prefix_lens, -1),
        timestamps=take(hits.timestamps, np.nan),
        keys=keys,
    )


def _mask(q: Query, history: list[int]) -> IntArray:
    seen = history if q.exclude_seen else []
    return np.unique(np.asarray([*seen, *q.exclude_items], dtype=np.int64))


def _answer(
    q: Query,
    ranked: tuple[IntArray, np.ndarray],
    hits: SearchResult | None,
    retrieved: Retrieved | None,
    row: int,
    retrieval: bool,
) -> Answer:
    if hits is None or retrieved is None:
        return Answer(ranked[0], ranked[1], 0, "encoder")
    used = np.flatnonzero(retrieved.ids[row] >= 0)
    memories: tuple[Memory, ...] = ()
    if q.explain:
        memories = tuple(
            Memory(
                memory_id=int(hits.ids[row, j]),
                item=int(hits.items[row, j]),
                user_id=str(hits.users[row, j]),
                similarity=float(hits.scores[row, j]),
                prefix_len=int(hits.prefix_lens[row, j]),
                timestamp=float(hits.timestamps[row, j]),
            )
            for j in used
        )
    return Answer(ranked[0], ranked[1], int(used.size), "retrieval" if retrieval else "encoder", memories)
