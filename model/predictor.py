"""The predictor: memrec's one scoring path, shared by the offline evaluator and the service.

A batch of queries is scored in two steps around the reads of the memory store, which the caller runs
wherever the store lives (a FAISS index over the bank offline, Redis or the embedded store online)::

    plan = predictor.prepare(histories, users, states)  encode (rows without a state); K; what to fetch
    hits = store.search(plan.states, plan.fetch)         the nearest memories, best first
    rows = store.followers(plan.wanted)                  item transitions of the queries' last items
    out  = predictor.finish(plan, hits, rows, masks, n)  select → fuse → vote → transitions → mask → top n

Selection keeps, per query, the memories that survive the rules, in similarity order: the leakage
rule offline (a user's own memories from the query's position on: its target and its future), the
cross-user rule (other users' memories only) when the model was fine-tuned with it. The fusion reads
the first K survivors (fewer with RAMRec's adaptive K), the memory vote the first ``vote.depth``.

What the predictor reads is the model directory's frozen :class:`InferenceConfig`; tuning returns new
values (model.tuning), it never changes a config in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from model import hybrid as hy
from model import transitions as tr
from model import vote as vt
from model.adaptive import adaptive_k
from model.artifact import Artifact
from model.explain import Why, explain_row
from model.frozen import Encode, frozen_encoder, frozen_fusion
from model.fusion import RetrievalFusion
from model.inference import InferenceConfig, inference_config
from model.sasrec import SASRec

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]
ENCODE_CHUNK = 16  # rows per encoder pass (see Predictor.encode)


class Candidates(Protocol):
    """A memory search's answer, best first per query: the store's ``SearchResult`` or the bank's."""

    @property
    def ids(self) -> np.ndarray: ...  # (B, F) memory ids, -1 = no memory

    @property
    def scores(self) -> np.ndarray: ...  # (B, F) cosine similarity to the query

    @property
    def items(self) -> np.ndarray: ...  # (B, F) the memories' next items

    @property
    def users(self) -> np.ndarray: ...  # (B, F) whose history each memory came from

    @property
    def prefix_lens(self) -> np.ndarray: ...  # (B, F) the memories' prefix lengths

    @property
    def keys(self) -> np.ndarray | None: ...  # (B, F, D) unit keys; None when only voters are read


@dataclass(frozen=True)
class Plan:
    """A prepared batch: its warm rows (those with a history) encoded, and what to fetch for them."""

    rows: int  # queries in the batch
    warm: IntArray  # (W,) the rows with a history: the only ones encoded, searched and scored
    states: FloatArray  # (W, D) encoder states
    depths: IntArray  # (W,) memories the fusion reads per query (k, or adaptive K)
    window: IntArray  # (W, ≤ max_len) each history's window, most recent first, 0 = none
    users: np.ndarray | None  # (W,) the querying users, for the cross-user and leakage rules
    prefix_lens: IntArray | None  # (W,) offline only: the leakage rule's positions
    fetch: int  # candidates to search per warm query; 0 = no search

    def subset(self, idx: IntArray) -> Plan:
        """The plan of warm rows ``idx`` alone (offline: a batch of a precomputed sample set)."""
        return Plan(
            rows=len(idx),
            warm=np.arange(len(idx), dtype=np.int64),
            states=self.states[idx],
            depths=self.depths[idx],
            window=self.window[idx],
            users=None if self.users is None else self.users[idx],
            prefix_lens=None if self.prefix_lens is None else self.prefix_lens[idx],
            fetch=self.fetch,
        )

    @property
    def recent(self) -> IntArray:
        """(W, MAX_ORDER) each history's last items, most recent first: what the channel reads."""
        out: IntArray = self.window[:, : tr.MAX_ORDER]
        if out.shape[1] < tr.MAX_ORDER:
            out = np.pad(out, ((0, 0), (0, tr.MAX_ORDER - out.shape[1])))
        return out

    @property
    def wanted(self) -> list[int]:
        """The items whose follower rows the transition channel reads."""
        out: list[int] = np.unique(self.recent[self.recent > 0]).tolist()
        return out


@dataclass(frozen=True)
class Memories:
    """The memories the fusion reads, (B, K) slots best first."""

    cols: IntArray  # (B, K) each slot's column among the candidates
    present: BoolArray  # (B, K) the slot holds a memory
    items: IntArray  # (B, K) next items, 0 at empty slots
    sims: FloatArray  # (B, K) cosine similarity, 0 at empty slots
    keys: FloatArray  # (B, K, D) unit keys


@dataclass(frozen=True)
class Scored:
    """The scores of a batch's warm rows and what made them (for explanations)."""

    scores: Tensor  # (W, n_ids) ranking scores, column 0 = -inf
    logits: Tensor  # (W, n_ids) the fused model's logits, before the vote and the channel
    memories: Memories | None
    voters: tuple[Tensor, Tensor] | None  # next items (W, V), similarities (W, V)
    shares: tr.Shares | None


@dataclass(frozen=True)
class Ranked:
    """One query's answer."""

    items: IntArray  # (≤ n,) best first
    scores: npt.NDArray[np.float64]  # (≤ n,)
    strategy: str  # "retrieval", "encoder" or "popular" (no history)
    k_used: int = 0  # memories fused
    memory_cols: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # the fused ones
    why: tuple[Why, ...] = ()  # per item, when asked


_UNSET = Ranked(np.zeros(0, np.int64), np.zeros(0), "popular")  # a placeholder finish overwrites


def select(
    hits: Candidates,
    width: int,
    users: np.ndarray | None = None,
    prefix_lens: IntArray | None = None,
    cross_user: bool = False,
    usable: BoolArray | None = None,
) -> tuple[IntArray, BoolArray]:
    """The columns (B, width) of each row's first ``width`` surviving candidates, in similarity order,
    and whether each slot holds one. With ``cross_user`` a row's own users' memories are dropped; with
    ``prefix_lens`` (offline) its own memories at or after its position (the leakage rule); with
    ``usable`` (B, F) the candidates it marks False."""
    keep = hits.ids >= 0 if usable is None else (hits.ids >= 0) & usable
    if users is not None and (cross_user or prefix_lens is not None):
        same = hits.users == users[:, None]
        keep &= ~(same if cross_user else same & (hits.prefix_lens >= np.asarray(prefix_lens)[:, None]))
    cols: IntArray = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # survivors first, stable
    kept: BoolArray = np.take_along_axis(keep, cols, axis=1)
    if cols.shape[1] < width:  # fewer candidates than slots
        pad = ((0, 0), (0, width - cols.shape[1]))
        cols, kept = np.pad(cols, pad), np.pad(kept, pad, constant_values=False)
    return cols, kept


def take(a: np.ndarray, cols: IntArray) -> np.ndarray:
    """(B, F, ...) → (B, S, ...) at each row's columns."""
    index = cols.reshape(cols.shape + (1,) * (a.ndim - 2))
    out: np.ndarray = np.take_along_axis(a, index, axis=1)
    return out


class Predictor:
    """The frozen encoder, the fusion module (None: the encoder alone) and the inference config."""

    def __init__(
        self,
        encoder: SASRec,
        fusion: RetrievalFusion | None,
        cfg: InferenceConfig,
        popular: IntArray | None = None,
        frozen: bool = False,
        new_item_weight: float = 1.0,
    ) -> None:
        self.encoder = encoder.eval()
        self.fusion = fusion.eval() if fusion is not None else None
        self.cfg = cfg
        self.n_ids = encoder.cfg.n_items + 1
        self.max_len = encoder.cfg.max_len
        # cold start: item ids, most frequent training targets first
        self.popular = popular if popular is not None else np.arange(1, self.n_ids, dtype=np.int64)
        # how much the transition counts of an item registered after training weigh against a trained
        # item's (model.transitions.weigh_from): a service setting, never met offline (no new items)
        self.new_item_weight = new_item_weight
        self._encode: Encode = encoder.encode
        self._fuse: Callable[..., Tensor] | None = self.fusion
        self.frozen = False
        if frozen:
            self._freeze()

    def _freeze(self) -> None:
        """Serve frozen graphs of the encoder and the fusion module where they are exact."""
        encode = frozen_encoder(self.encoder)
        if encode is not None:
            self._encode = encode
        fuse = None
        if self.fusion is not None and self.cfg.k > 0 and not self.cfg.user_memories:
            fuse = frozen_fusion(self.fusion, self.encoder.cfg.dim, self.cfg.k)
            if fuse is not None:
                self._fuse = fuse
        self.frozen = encode is not None and (self.fusion is None or fuse is not None)

    @property
    def retrieval(self) -> bool:
        return self.fusion is not None and self.cfg.k > 0

    @property
    def votes(self) -> bool:
        """Whether the memory vote mixes into the scores: it is on, and it reads retrieved memories."""
        return self.cfg.vote.on and self.retrieval

    @property
    def fetch(self) -> int:
        """Candidates to search per query online, so that ``depth`` survive the cross-user rule."""
        if not self.retrieval:
            return 0
        depth = self.cfg.depth
        return max(depth * self.cfg.fetch_factor, depth) if self.cfg.cross_user else depth

    # --- step 1: prepare ---------------------------------------------------------------------------

    def prepare(
        self,
        histories: Sequence[Sequence[int]],
        users: Sequence[object] | None = None,
        states: Sequence[FloatArray | None] | None = None,
    ) -> Plan:
        """Histories (item ids ≥ 1, oldest first; empty: a cold user) → the encoded plan of the batch.

        Items the model was not trained on (ids past its vocabulary, registered by the store since) are
        skipped: the encoder has no embedding to read, and the transition channel reads the query's last
        items the model knows, so a new item takes no trained item's place among them (its few
        followers stood for that place badly: on the time-split replay of ml-100k, reading new items
        there lowered the other events' hit rate). A new item is still recommended through the channel
        as a follower. A history without any item the encoder knows is answered as a cold user's.

        ``states``: per row, the state (D,) of that very history computed before (:meth:`encode` of its
        :meth:`window`: the service keeps one per user beside the stored history) or None; only the rows
        without one are encoded."""
        known = [self.known(h) for h in histories]
        warm = np.asarray([i for i, h in enumerate(known) if len(h)], dtype=np.int64)
        windows = [known[i][-self.max_len :] for i in warm]
        given = [states[i] if states is not None else None for i in warm]
        todo = [j for j, state in enumerate(given) if state is None]
        out = np.empty((len(windows), self.encoder.cfg.dim), np.float32)  # (W, D)
        if todo:
            out[todo] = self.encode([windows[j] for j in todo])
        for j, state in enumerate(given):
            if state is not None:
                out[j] = state
        who = None if users is None else np.asarray([users[i] for i in warm], dtype=object)
        return self.plan(out, windows, who, len(histories), warm)

    def known(self, history: Sequence[int] | IntArray) -> IntArray:
        """The items of ``history`` the encoder was trained on, in order."""
        h = np.asarray(history, dtype=np.int64)
        out: IntArray = h[h < self.n_ids]
        return out

    def window(self, history: Sequence[int] | IntArray) -> IntArray:
        """What the encoder reads of ``history``: the last ``max_len`` of its known items (empty: none)."""
        return self.known(history)[-self.max_len :]

    def plan(
        self,
        states: FloatArray,
        windows: Sequence[IntArray],
        users: np.ndarray | None = None,
        rows: int | None = None,
        warm: IntArray | None = None,
        prefix_lens: IntArray | None = None,
    ) -> Plan:
        """The plan of already encoded queries: ``states`` (W, D) of the non-empty ``windows`` (their
        last ≤ max_len items); offline, ``prefix_lens`` turns the leakage rule on."""
        n = len(windows)
        return Plan(
            rows=n if rows is None else rows,
            warm=np.arange(n, dtype=np.int64) if warm is None else warm,
            states=states,
            depths=self.depths(windows),  # over the whole set at once offline: one batching
            window=tr.last_items(windows, self.max_len),
            users=users,
            prefix_lens=prefix_lens,
            fetch=self.fetch,
        )

    @torch.inference_mode()
    def encode(self, windows: Sequence[Sequence[int] | IntArray]) -> FloatArray:
        """Non-empty histories (item ids ≥ 1, oldest first) → states (B, D) float32 of their last items.

        Encoded in length-sorted chunks of at most ``ENCODE_CHUNK`` rows: one padded (B, T) pass costs
        as if every row were the longest, and attention grows with T². On Beauty histories a batch of 42
        took 9.0 ms in one pass and 3.9 ms in chunks of 16."""
        rows = [self.window(h) for h in windows]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if not lengths.all():
            raise ValueError("a history to encode holds no item the encoder knows (see Predictor.known)")
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(rows), self.encoder.cfg.dim), dtype=np.float32)
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = order[start : start + ENCODE_CHUNK]
            items = np.zeros((len(chunk), int(lengths[chunk].max())), dtype=np.int64)  # (b, T) right-padded
            for j, i in enumerate(chunk):
                items[j, : lengths[i]] = rows[i]
            h = self._encode(torch.from_numpy(items), torch.from_numpy(lengths[chunk]))
            out[chunk] = h.float().numpy()
        return out

    @torch.inference_mode()
    def depths(self, windows: Sequence[IntArray]) -> IntArray:
        """K per query: RAMRec's entropy rule when the model was fine-tuned with it, else k."""
        adaptive = self.cfg.adaptive()
        if not self.retrieval or adaptive is None:
            return np.full(len(windows), self.cfg.k if self.retrieval else 0, dtype=np.int64)
        out: IntArray = adaptive_k(self.encoder.item_emb.weight, list(windows), adaptive)
        return out

    # --- step 2: select, fuse, vote, mix, rank -------------------------------------------------------

    def memories(self, plan: Plan, hits: Candidates) -> Memories:
        """The fusion's memories: the first k survivors of each query, cut to its depth."""
        assert hits.keys is not None, "the fusion reads the memories' keys: search with keys"
        k = self.cfg.k
        # only memories whose value the model embeds (not an item registered since training): the
        # fusion reads the value, so such a memory gives its slot to the next one searched, if any
        usable = hits.items < self.n_ids
        cols, kept = select(hits, k, plan.users, plan.prefix_lens, self.cfg.cross_user, usable)
        present = kept & (np.arange(k)[None, :] < plan.depths[:, None])  # adaptive K
        items = np.where(present, take(hits.items, cols), 0).astype(np.int64)
        sims = np.where(present, take(hits.scores, cols), 0.0).astype(np.float32)
        return Memories(cols, present, items, sims, take(hits.keys, cols))

    def voters(self, plan: Plan, hits: Candidates, depth: int | None = None) -> tuple[Tensor, Tensor]:
        """The memory vote's voters: next items (W, V), 0 at empty slots, and similarities (W, V);
        V = ``depth``, by default the vote's."""
        depth = self.cfg.vote.depth if depth is None else depth
        cols, kept = select(hits, depth, plan.users, plan.prefix_lens, self.cfg.cross_user)
        items = np.where(kept, take(hits.items, cols), 0).astype(np.int64)
        sims = np.where(kept, take(hits.scores, cols), -np.inf).astype(np.float32)
        return torch.from_numpy(items), torch.from_numpy(sims)

    def fused(self, states: Tensor, mem: Memories | None, user_items: IntArray | None = None) -> Tensor:
        """States (B, D) → the fused state ĥ (B, D): the served graph, or the module itself (with the
        gradient, in training) when the user's own memories join."""
        if mem is None or self.fusion is None or self._fuse is None:
            return states
        keys, values, present, sims, user_slots = self.memory_inputs(states, mem, user_items)
        if user_slots is not None:
            out: Tensor = self.fusion(states, keys, values, present, sims, user_slots)
            return out
        fuse = self._fuse if not torch.is_grad_enabled() else self.fusion
        out = fuse(states, keys, values, present, sims)
        return out

    def memory_inputs(
        self, states: Tensor, mem: Memories, user_items: IntArray | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The fusion's inputs: keys, values (B, S, D), presence, similarities (B, S) and the
        user-slot mask (B, S) or None; S = K + C, the user's own C memories last."""
        device = states.device
        keys = torch.from_numpy(mem.keys).to(device)
        values = self.encoder.item_emb(torch.from_numpy(mem.items).to(device))  # padding row when empty
        present = torch.from_numpy(mem.present).to(device)
        sims = torch.from_numpy(mem.sims).to(device)
        if user_items is None:
            return keys, values, present, sims, None
        u_values = self.encoder.item_emb(torch.from_numpy(user_items).to(device))  # (B, C, D)
        u_keys = F.normalize(u_values, dim=-1)
        u_present = torch.from_numpy(user_items > 0).to(device)
        u_sims = torch.einsum("bd,bcd->bc", F.normalize(states, dim=-1), u_keys) * u_present
        user_slots = torch.cat([torch.zeros_like(present), torch.ones_like(u_present)], dim=1)
        return (
            torch.cat([keys, u_keys], dim=1),
            torch.cat([values, u_values], dim=1),
            torch.cat([present, u_present], dim=1),
            torch.cat([sims, u_sims], dim=1),
            user_slots,
        )

    def score(
        self,
        plan: Plan,
        hits: Candidates | None,
        rows: Mapping[int, tr.Row] | None,
        voters: Candidates | None = None,
        user_items: IntArray | None = None,
        new_items: Tensor | None = None,
    ) -> Scored:
        """Scores over the catalogue of the plan's warm rows: fused logits, mixed with the memory
        vote (``voters``, default ``hits``) and the transition channel (``rows``: the store's follower
        rows of ``plan.wanted``) where the model has them on. ``new_items`` (m, D): embeddings of the
        items registered since training (ids n_items + 1 …, model.catalogue), NaN where nothing is
        known of one yet; they widen the catalogue to n_items + 1 + m columns."""
        dev = self.encoder.item_emb.weight.device
        states = torch.from_numpy(plan.states).to(dev)
        mem = self.memories(plan, hits) if hits is not None and self.retrieval else None
        fused = self.fused(states, mem, user_items)
        voting = voters if voters is not None else hits
        vote_in = self.voters(plan, voting) if self.votes and voting is not None else None
        logits = self.encoder.scores(fused)
        if new_items is not None:  # the catalogue has grown since training: as wide as any id read
            extra = _widened(new_items, self.n_ids, vote_in, rows if self.cfg.reads_transitions else None)
            logits = torch.cat([logits, (fused @ extra.to(dev).T).nan_to_num(nan=-math.inf)], dim=1)
        scores, shares = logits, None
        if vote_in is not None:
            items, sims = vote_in
            vote_in = (items.where(items < logits.shape[1], 0).to(dev), sims.to(dev))  # a newer item: no vote
            scores = vt.mix(scores, vote_in[0], vote_in[1], self.cfg.vote)
        if self.cfg.hybrid is not None and rows is not None:
            by_position = self.position_shares(plan.recent, rows, logits.shape[1]).to(dev)
            shares = by_position.combined()  # what the explanations read of the channel
            window = torch.from_numpy(plan.window).to(dev)
            scores = hy.score(self.cfg.hybrid, scores, by_position, window)
        elif self.cfg.transitions.on and rows is not None:
            shares = self.shares(plan.recent, rows, logits.shape[1]).to(dev)
            scores = tr.mix(scores, shares, self.cfg.transitions)
        return Scored(scores, logits, mem, vote_in, shares)

    def position_shares(
        self, recent: IntArray, rows: Mapping[int, tr.Row], width: int | None = None, order: int | None = None
    ) -> tr.PositionShares:
        """The transition shares of queries whose last items are ``recent`` (B, MAX_ORDER) by query
        position, over the first ``width`` ids (default: the model's vocabulary), at ``order`` (default:
        what the model reads); the items past the vocabulary (registered since training) weighted by
        ``new_item_weight``."""
        order = order or self.cfg.transition_order
        shares = tr.position_shares(recent, rows, width or self.n_ids, order)
        return tr.weigh_from(shares, self.n_ids, self.new_item_weight)

    def shares(
        self, recent: IntArray, rows: Mapping[int, tr.Row], width: int | None = None, order: int | None = None
    ) -> tr.Shares:
        """The channel's shares (:meth:`position_shares` summed over the positions)."""
        return self.position_shares(recent, rows, width, order).combined()

    @torch.inference_mode()
    def finish(
        self,
        plan: Plan,
        hits: Candidates | None,
        rows: Mapping[int, tr.Row] | None,
        masks: Sequence[IntArray],
        n: Sequence[int],
        explain: Sequence[bool] = (),
        new_items: Tensor | None = None,
        user_items: IntArray | None = None,
    ) -> list[Ranked]:
        """Each query's top ``n[i]`` items, ``masks[i]`` removed; cold rows get the popular items.
        ``new_items``: the embeddings of the items registered since training; ``user_items`` (W, C): the
        warm rows' own memories when the model fuses them (:meth:`score`)."""
        is_warm = np.zeros(plan.rows, dtype=bool)
        is_warm[plan.warm] = True
        out = [self.cold_start(masks[i], n[i]) if not is_warm[i] else _UNSET for i in range(plan.rows)]
        if not len(plan.warm):
            return out
        scored = self.score(plan, hits, rows, user_items=user_items, new_items=new_items)
        warm = plan.warm.tolist()
        explained = any(explain[i] for i in warm if i < len(explain))
        ranked = scored.scores.clone() if explained and scored.scores is scored.logits else scored.scores
        top = self.top(ranked, [masks[i] for i in warm], [n[i] for i in warm])  # masks in place
        strategy = "retrieval" if scored.memories is not None else "encoder"
        for j, i in enumerate(warm):
            items, scores = top[j]
            cols = np.zeros(0, np.int64)
            if scored.memories is not None:
                cols = scored.memories.cols[j][scored.memories.present[j]]
            why = explain_row(self, plan, scored, j, items, rows) if i < len(explain) and explain[i] else ()
            out[i] = Ranked(items, scores, strategy, int(cols.size), cols, why)
        return out

    def top(
        self, scores: Tensor, masks: Sequence[IntArray], n: Sequence[int]
    ) -> list[tuple[IntArray, npt.NDArray[np.float64]]]:
        """Masked items removed, the top n[i] of row i: (item ids, scores); -inf scores never come."""
        width = scores.shape[1]
        masks = [m[m < width] for m in masks]  # an item newer than the catalogue scored is not in it
        if any(m.size for m in masks):  # one indexed write for the batch, not one per row
            rows = torch.from_numpy(np.repeat(np.arange(len(masks)), [m.size for m in masks]))
            scores[rows, torch.from_numpy(np.concatenate(masks).astype(np.int64))] = -torch.inf
        top_s, top_i = torch.topk(scores, k=min(max(n), width - 1), dim=1)
        out = []
        for i, want in enumerate(n):
            s, ids = top_s[i, :want].cpu().numpy(), top_i[i, :want].cpu().numpy()
            keep = np.isfinite(s)
            out.append((ids[keep].astype(np.int64), s[keep].astype(np.float64)))
        return out

    def cold_start(self, mask: IntArray, n: int) -> Ranked:
        """The most frequent training targets, masked items removed."""
        order = self.popular[~np.isin(self.popular, mask)][:n]
        return Ranked(order, np.zeros(len(order), dtype=np.float64), "popular")


def _widened(
    new_items: Tensor, n_ids: int, voters: tuple[Tensor, Tensor] | None, rows: Mapping[int, tr.Row] | None
) -> Tensor:
    """``new_items`` (m, D) padded with NaN rows (no embedding yet) up to the largest item id the voters
    or the follower rows name: an item registered after the embeddings were derived still gets its
    vote and its transitions."""
    width = n_ids + len(new_items)
    if voters is not None and voters[0].numel():
        width = max(width, int(voters[0].max()) + 1)
    for nxt, _, _ in (rows or {}).values():
        if nxt.size:
            width = max(width, int(nxt.max()) + 1)
    pad = torch.full((width - n_ids - len(new_items), new_items.shape[1]), float("nan"))
    return torch.cat([new_items.float(), pad])


def popularity(targets: IntArray, n_items: int) -> IntArray:
    """Item ids by how often they are a training target, ties by id: the cold-start list."""
    counts = np.bincount(targets, minlength=n_items + 1)[: n_items + 1]
    order: IntArray = np.argsort(-counts[1:], kind="stable") + 1
    return order


def from_artifact(art: Artifact, frozen: bool = False, new_item_weight: float = 1.0) -> Predictor:
    """The predictor of a loaded model directory; ``frozen`` serves frozen graphs (the request path)."""
    n_items = art.encoder.cfg.n_items
    popular = popularity(art.bank.items, n_items) if art.bank is not None else None
    return Predictor(art.encoder, art.fusion, inference_config(art), popular, frozen, new_item_weight)
