"""The recommend pipeline, pure of HTTP: history → prepare → search and followers → finish → answer.

The scoring itself is the predictor's (model.predictor), the very code the offline evaluator runs; this
module reads the store around it. Concurrent requests are queued and served in micro-batches: one
history read (the store's only round trip: the users' encoder states come with their histories), one
encoder pass over the rows without a stored state (a request history, or a state missing or stale,
which is then written back: service.states), one search with the follower rows beside it (both in this
replica's index) and one scoring pass per batch. A model that fuses per-user memories reads the batch's
users' memories too, in a second store call beside the search (service.user_memories). The benchmark
drives it without a server.

The model work of a batch runs in the event-loop thread itself. A micro-batch costs a few milliseconds
of CPU that holds the GIL for most of it anyway; handing it to worker threads added a thread hop per
stage and, under load, GIL hand-offs that tripled each stage's wall time. Requests that arrive while a
batch computes wait in the socket buffers and form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from memory_store import MemoryStore, SearchResult
from memory_store.states import StoredHistories
from memory_store.transitions import Followers
from model import transitions as tr
from model.catalogue import derived_embeddings
from model.predictor import Plan, Predictor, Ranked
from service.errors import store_errors
from service.metrics import Metrics
from service.states import WriteBack, user_states
from service.user_memories import AccessRecorder, UserMemorySetup, accesses, snapshot

log = logging.getLogger(__name__)

NEW_ITEM_REFRESH_S = 1.0  # how stale the derived embeddings of new items may be

IntArray = np.ndarray


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
class Why:
    """One recommended item's sources (model.explain.Why) with its memories named."""

    encoder_rank: int
    model: float
    vote: float
    transitions: float
    memories: tuple[int, ...]  # memory ids among the answer's memories whose next item it is
    follows: tuple[tuple[int, float], ...]  # (recent item, its share of the item's transition mass)


@dataclass(frozen=True, slots=True)
class Answer:
    items: IntArray  # (≤ n,) internal item ids, best first
    scores: np.ndarray  # (≤ n,) float64
    k_used: int
    strategy: str  # "retrieval", "encoder" or "popular"
    memories: tuple[Memory, ...] = field(default=())
    degraded: bool = False  # the stored history could not be read
    why: tuple[Why, ...] = ()  # per item, with explain


@dataclass
class _Pending:
    query: Query
    future: asyncio.Future[Answer]


class Pipeline:
    """Owns the micro-batching worker; :meth:`start` it inside a running loop, :meth:`stop` it at the end."""

    def __init__(
        self,
        predictor: Predictor,
        store: MemoryStore,
        metrics: Metrics,
        history_len: int = 50,
        mask_len: int = 200,
        max_batch: int = 64,
        max_wait_s: float = 0.003,
        user_memories: UserMemorySetup | None = None,
        new_item_embeddings: bool = True,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.metrics = metrics
        self.history_len = history_len  # items the encoder reads
        self.mask_len = max(mask_len, history_len)  # items exclude_seen removes (all the store keeps)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._filling: asyncio.Future[None] | None = None  # resolved when the batch collected is full
        self._worker: asyncio.Task[None] | None = None
        self.new_items = NewItemEmbeddings(predictor, store, derive=new_item_embeddings)
        self.write_back = WriteBack(store)
        self.user_memories = user_memories  # the model's per-user memories (service.user_memories)
        self.accesses = AccessRecorder(store)

    @property
    def running(self) -> bool:
        return self._worker is not None

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
        await self.write_back.drain()
        await self.accesses.drain()

    async def recommend(self, query: Query) -> Answer:
        """Queue one request and wait for its batch."""
        if self._worker is None:
            raise RuntimeError("the pipeline is not started")
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(query, fut))  # unbounded: never waits
        if self._filling is not None and self._queue.qsize() + 1 >= self.max_batch:
            _resolve(self._filling)  # the batch being collected is full: no need to wait on
        return await fut

    async def _collect(self) -> list[_Pending]:
        """The next batch: the first request, and those that arrive within ``max_wait_s`` of it, up to
        ``max_batch``. One timer per batch (not a ``wait_for`` per request: a task and a timer each)."""
        batch = [await self._queue.get()]
        if self.max_wait_s > 0 and self._queue.qsize() + 1 < self.max_batch:
            loop = asyncio.get_running_loop()
            self._filling = loop.create_future()
            timer = loop.call_later(self.max_wait_s, _resolve, self._filling)
            try:
                await self._filling
            finally:
                timer.cancel()
                self._filling = None
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
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
        stored, degraded = await self._histories(queries)
        seen = [[*s, *q.history] for s, q in zip(stored.histories, queries, strict=True)]  # masked
        histories = [h[-self.history_len :] for h in seen]  # encoded
        # a stored state encodes the stored history alone: a request history is encoded with it
        given = [None if q.history else s for q, s in zip(queries, stored.states, strict=True)]
        unavailable = await self.store.unavailable_items()  # this replica's copy: no round trip
        masks = [_mask(q, h, unavailable) for q, h in zip(queries, seen, strict=True)]
        with self._stage("encode"):
            plan = self.predictor.prepare(histories, [q.user_id for q in queries], given)
        if not degraded:
            self._keep_encoded(queries, histories, given, plan)
        if self.user_memories is None:
            (hits, rows), user_items = await self._fetch(plan), None
        else:  # the users' own memories, read beside the search
            (hits, rows), user_items = await asyncio.gather(
                self._fetch(plan), self._user_items(queries, plan, stored.histories, degraded)
            )
        new_items = await self.new_items.current()
        with self._stage("score"):
            ranked = self.predictor.finish(
                plan,
                hits,
                rows,
                masks,
                [q.n for q in queries],
                [q.explain for q in queries],
                new_items,
                user_items,
            )
        row_of = {int(i): j for j, i in enumerate(plan.warm)}  # batch row → its row among the searched
        out = [
            _answer(q, r, hits, row_of.get(i), degraded)
            for i, (q, r) in enumerate(zip(queries, ranked, strict=True))
        ]
        for a in out:
            self.metrics.k_used.observe(a.k_used)
        return out

    async def _histories(self, queries: list[Query]) -> tuple[StoredHistories, bool]:
        """The stored histories with their encoder states, or none (degraded) while the store is
        unreachable: the answers then come from the requests' own histories and this replica's index."""
        users = [q.user_id for q in queries]
        with self._stage("history"):
            try:
                return await self.store.histories_with_states(users, self.mask_len), False
            except store_errors() as exc:
                log.warning("store unreachable, answering %d requests degraded: %s", len(queries), exc)
                self.metrics.degraded.inc(len(queries))
                return StoredHistories([[] for _ in queries], [None] * len(queries)), True

    def _keep_encoded(
        self, queries: list[Query], histories: list[list[int]], given: list[np.ndarray | None], plan: Plan
    ) -> None:
        """Count the warm rows by where their state came from, and write back the states encoded for
        stored histories (no request history): the store had none that fit."""
        warm = plan.warm.tolist()
        encoded = [j for j, i in enumerate(warm) if given[i] is None]
        self.metrics.user_states.labels("stored").inc(len(warm) - len(encoded))
        self.metrics.user_states.labels("encoded").inc(len(encoded))
        back = [j for j in encoded if not queries[warm[j]].history]
        if back:
            rows = [warm[j] for j in back]
            put = user_states(
                [queries[i].user_id for i in rows], [histories[i] for i in rows], list(plan.states[back])
            )
            if put is not None:
                self.write_back.submit(put)

    async def _user_items(
        self, queries: list[Query], plan: Plan, held: list[list[int]], degraded: bool
    ) -> IntArray | None:
        """The warm rows' user memories (W, C) when the model fuses them, read in one store call: the
        stored ones of the query's user, also for a request with its own history (which is not stored,
        so it is no step of the user's sequence). Each query accesses its ``access_top`` entries at its
        user's count (``held``: the stored histories), recorded in the background. All empty while the
        store is unreachable (degraded: answered without them); None without a warm row."""
        setup = self.user_memories
        if setup is None or not len(plan.warm):
            return None
        warm = plan.warm.tolist()
        users = [queries[i].user_id for i in warm]
        try:
            entries = [] if degraded else await self.store.user_memories(users)
        except store_errors() as exc:
            log.warning("user memories unreadable, answering %d requests without: %s", len(users), exc)
            entries = []
        if not entries:
            return np.zeros((len(warm), setup.cfg.capacity), dtype=np.int64)
        touched = accesses(entries, plan.states, setup.cfg.access_top)
        self.accesses.submit([(users[j], items, float(len(held[warm[j]]))) for j, items in touched])
        return snapshot(entries, setup.cfg.capacity)

    async def _fetch(self, plan: Plan) -> tuple[SearchResult | None, dict[int, tr.Row] | None]:
        """The plan's nearest memories and its follower rows, read from the store concurrently."""
        predictor = self.predictor
        search = predictor.retrieval and plan.fetch > 0 and len(plan.warm) > 0
        wanted = plan.wanted if predictor.cfg.reads_transitions and len(plan.warm) else None
        with self._stage("retrieve"):
            found = await asyncio.gather(
                self.store.search(plan.states, plan.fetch, with_keys=True) if search else _none(),
                self.store.followers(wanted) if wanted is not None else _none(),
            )
        hits: SearchResult | None = found[0]
        rows = None
        if found[1] is not None and wanted is not None:
            rows = {a: (f.items, f.lags, f.counts) for a, f in zip(wanted, found[1], strict=True)}
        return hits, rows


class NewItemEmbeddings:
    """The derived embeddings of the items registered after training (model.catalogue), from the
    memories this replica holds; re-derived at most every ``refresh_s``, so that the encoder's side
    follows the counts as they grow. The vote and the transition channel read a new item at once.

    Without ``derive`` every new item's row is NaN: the encoder and the fusion give new items no
    probability, and only the vote and the channel rank them. On the time-split replays of ml-100k the
    derived embeddings brought new items back about as often as the channel and the vote alone did, and
    scored all events no better (see ``new_item_embeddings`` in service.settings)."""

    def __init__(
        self,
        predictor: Predictor,
        store: MemoryStore,
        refresh_s: float = NEW_ITEM_REFRESH_S,
        derive: bool = True,
    ) -> None:
        self.predictor = predictor
        self.store = store
        self.refresh_s = refresh_s
        self.derive = derive
        self._at = -math.inf
        self._value: torch.Tensor | None = None

    async def current(self) -> torch.Tensor | None:
        """(m, D) for ids n_items + 1 … n_items + m, NaN rows where nothing is known yet; None while no
        memory names a new item (without ``derive``: while none is registered)."""
        now = time.monotonic()
        if now - self._at >= self.refresh_s:
            self._at = now
            if self.derive:
                self._value = self._derive(await self.store.predecessors(self.predictor.n_ids))
            else:  # the replica's copy of the catalogue: no pass over the memories
                self._value = self._unembedded(await self.store.new_items())
        return self._value

    def _unembedded(self, registered: Mapping[str, int]) -> torch.Tensor | None:
        """A NaN row for every registered new item: the encoder and the fusion give them nothing."""
        if not registered:
            return None
        width = max(registered.values()) + 1 - self.predictor.n_ids
        return torch.full((width, self.predictor.encoder.cfg.dim), math.nan)

    def _derive(self, rows: Mapping[int, Followers]) -> torch.Tensor | None:
        if not rows:
            return None
        first = self.predictor.n_ids
        table = self.predictor.encoder.item_emb.weight.detach()
        empty = Followers.empty()
        per_item = [rows.get(b, empty) for b in range(first, max(rows) + 1)]
        order = self.predictor.cfg.transition_order
        return derived_embeddings(table, [(f.items, f.lags, f.counts) for f in per_item], order)


async def _none() -> None:
    return None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _mask(q: Query, history: list[int], unavailable: IntArray) -> IntArray:
    """The items never to recommend to ``q``: its history (when asked), its exclusions and the items
    marked unavailable (cold-start answers included). Only the request's own part is deduplicated: the
    unavailable set (sorted, unique) is appended as it is rather than sorted in again per request, and
    masking an item twice is harmless."""
    seen = history if q.exclude_seen else []
    return np.concatenate([np.unique(np.asarray([*seen, *q.exclude_items], dtype=np.int64)), unavailable])


def _memory(hits: SearchResult, row: int, col: int) -> Memory:
    return Memory(
        memory_id=int(hits.ids[row, col]),
        item=int(hits.items[row, col]),
        user_id=str(hits.users[row, col]),
        similarity=float(hits.scores[row, col]),
        prefix_len=int(hits.prefix_lens[row, col]),
        timestamp=float(hits.timestamps[row, col]),
    )


def _answer(q: Query, r: Ranked, hits: SearchResult | None, row: int | None, degraded: bool) -> Answer:
    """The predictor's answer with the memories it used named from the search (with explain)."""
    memories: tuple[Memory, ...] = ()
    why: tuple[Why, ...] = ()
    if q.explain and hits is not None and row is not None:
        memories = tuple(_memory(hits, row, int(c)) for c in r.memory_cols)
        why = tuple(
            Why(
                w.encoder_rank,
                w.model,
                w.vote,
                w.transitions,
                tuple(int(hits.ids[row, c]) for c in w.memory_cols),
                w.follows,
            )
            for w in r.why
        )
    return Answer(r.items, r.scores, r.k_used, r.strategy, memories, degraded, why)
