"""Transition channel: the memory bank's pairs read as item transitions, mixed into the ranking.

A memory is one (prefix → next item) event; its prefix's last items say which items came just before
the next one. Counting them over the bank gives, for every item a, how often each item b followed it at
lag k (k = 1: right after). A query whose history ends in q_1 (most recent), q_2, … gets the next-item
distribution::

    share(b) = Σ_{j ≤ order} w(j) Σ_{k ≤ order} w(k) · count_k(q_j → b),    w(k) ∝ 1 / k
    p_trans  = share / Σ share
    score(b) = log((1 − λ) · p_model(b) + λ · p_trans(b))

with p_model the softmax of the model's scores (the fused logits, or their mix with the memory vote).
λ = 0 is the model alone; it is chosen on validation (:func:`tune`) like the vote, and stays off unless
it wins there by ``min_z`` standard errors. Nothing is trained.

On the sparse Amazon data first-order co-occurrence carries much of the next-item signal, and a live
memory bank changes the counts with every interaction: this channel is what makes live memories move
the ranking (the fusion module reads the memories only through one attention-refined state).

The weights are integers (w(k) = lcm(1..order) / k) and so are the counts, so ``share`` is an exact
integer in float64 whichever way it is summed. Offline and online read the same per-item follower
rows (:func:`follower_rows` over a bank in memory, the memory store's ``followers`` live) through the
same :func:`shares_from_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.data import IntArray
from model.evaluate import KS, metrics_from_ranks, target_ranks
from model.vote import paired_z

MAX_ORDER = 5  # prefix items a memory keeps (the memory store keeps as many)


@dataclass(frozen=True)
class TransitionMix:
    weight: float = 0.0  # λ: the transitions' share of the probability; 0 = off
    order: int = MAX_ORDER  # query items and lags that count

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight < 1.0:
            raise ValueError(f"transition weight must be in [0, 1), got {self.weight}")
        if not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"transition order must be in 1..{MAX_ORDER}, got {self.order}")

    @property
    def on(self) -> bool:
        return self.weight > 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


WEIGHTS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)  # λ candidates of tune (1.0 would drop the model)
ORDERS = tuple(range(1, MAX_ORDER + 1))  # order candidates of tune


def lag_weights(order: int) -> np.ndarray:
    """(order,) int64 w(k) = lcm(1..order) / k: 1/k up to a common factor, in integers."""
    scale = math.lcm(*range(1, order + 1))
    return np.asarray([scale // k for k in range(1, order + 1)], np.int64)


def recent_items(inputs: IntArray, lengths: IntArray, width: int = MAX_ORDER) -> IntArray:
    """Right-padded prefixes (N, T) with lengths (N,) → their last ``width`` items (:func:`last_items`)."""
    return last_items([row[:n] for row, n in zip(inputs, lengths, strict=True)], width)


def last_items(histories: Sequence[Sequence[int] | IntArray], width: int = MAX_ORDER) -> IntArray:
    """Each history's last ``width`` items, most recent first (n, width), 0 where it is shorter: what a
    memory keeps of its prefix, and what a query's transitions are read from."""
    out = np.zeros((len(histories), width), np.int64)
    for i, h in enumerate(histories):
        tail = np.asarray(h[-width:], dtype=np.int64)[::-1]
        out[i, : len(tail)] = tail
    return out


Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # next items, lags 1.., counts: one per (item, lag)


def follower_rows(items: IntArray, recent: IntArray, order: int = MAX_ORDER) -> dict[int, Row]:
    """Every item a's row: (next items, lags, counts) over memories with next items ``items`` (N,) and
    prefixes ending in ``recent`` (N, ≥ order), one entry per (next item, lag), sorted: what the memory
    store's ``followers`` returns, built here for a bank held in memory (offline)."""
    a = np.concatenate([recent[:, k] for k in range(order)])
    b = np.tile(items, order)
    lag = np.repeat(np.arange(1, order + 1, dtype=np.int64), len(items))
    has = a > 0
    a, b, lag = a[has], b[has], lag[has]
    if not a.size:
        return {}
    n_ids = int(max(a.max(), b.max())) + 1
    code, counts = np.unique((a * n_ids + b) * (order + 1) + lag, return_counts=True)  # a, then b, then lag
    lags, pair = code % (order + 1), code // (order + 1)
    nxt, src = pair % n_ids, pair // n_ids
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    ends = np.r_[starts[1:], src.size]
    return {int(src[s]): (nxt[s:e], lags[s:e], counts[s:e]) for s, e in zip(starts, ends, strict=True)}


@dataclass(frozen=True)
class Shares:
    """Each query's unnormalised shares, sparse: ``items[i, :n]`` its items with a share (ascending, 0 =
    padding after them), ``values`` their shares (exact integers in float64, 0 at padding)."""

    items: Tensor  # (B, M) int64
    values: Tensor  # (B, M) float64

    def to(self, device: torch.device | str) -> Shares:
        return Shares(self.items.to(device), self.values.to(device))

    def dense(self, n_ids: int) -> Tensor:
        """(B, n_ids) float64, for inspection."""
        out = torch.zeros(self.items.shape[0], n_ids, dtype=torch.float64, device=self.items.device)
        return out.scatter_add_(1, self.items, self.values)


def _pack(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int) -> PositionShares:
    """(row, column, values (order,)) triples, sorted by row then column, columns unique per row."""
    counts = np.bincount(rows, minlength=n_rows)
    width = int(counts.max(initial=0))
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)  # position in its row
    items = np.zeros((n_rows, width), np.int64)
    values = np.zeros((n_rows, width, vals.shape[1]), np.float64)
    items[rows, slot], values[rows, slot] = cols, vals
    return PositionShares(torch.from_numpy(items), torch.from_numpy(values))


@dataclass(frozen=True)
class PositionShares:
    """Each query's shares split by the position of the query item they follow: ``values[i, m, j]`` =
    Σ_k w(k) · count_k(q_{j+1} → items[i, m]) (exact integers in float64, 0 at padding), ``items`` as in
    :class:`Shares`. The learned hybrid (model.hybrid) weighs the positions itself; the channel sums
    them with the weights w(j) (:meth:`combined`)."""

    items: Tensor  # (B, M) int64
    values: Tensor  # (B, M, order) float64

    @property
    def order(self) -> int:
        return int(self.values.shape[2])

    def combined(self) -> Shares:
        """The channel's shares: Σ_j w(j) · values[..., j], the same integers :func:`shares_from_rows`
        gives at this order."""
        w = torch.from_numpy(lag_weights(self.order).astype(np.float64)).to(self.values.device)
        return Shares(self.items, self.values @ w)

    def to(self, device: torch.device | str) -> PositionShares:
        return PositionShares(self.items.to(device), self.values.to(device))


def shares_from_rows(
    query_recent: IntArray, rows: Mapping[int, Row], n_ids: int, order: int = MAX_ORDER
) -> Shares:
    """The same shares from the store's rows: ``rows[a]`` = (next items, lags, counts), one entry per
    (next item, lag), for every item a of ``query_recent`` (B, ≥ order)."""
    return position_shares(query_recent, rows, n_ids, order).combined()


def position_shares(
    query_recent: IntArray, rows: Mapping[int, Row], n_ids: int, order: int = MAX_ORDER
) -> PositionShares:
    """The shares of :func:`shares_from_rows` before the positions are summed. Vectorised over the
    batch: a Python loop per (query, item) cost more than the rest of the request path."""
    w = lag_weights(order)
    query_recent = query_recent[:, :order]
    q_row, q_slot = np.nonzero(query_recent)  # (S,) the present (query, j) slots
    keys = list(rows)
    lengths = np.asarray([rows[a][0].size for a in keys], np.int64)
    if not q_row.size or not lengths.sum():
        none = np.zeros(0, np.int64)
        return _pack(none, none, np.zeros((0, order), np.float64), len(query_recent))
    nxt, lags, counts = (np.concatenate([rows[a][f] for a in keys]) for f in range(3))
    ok = (lags <= order) & (nxt < n_ids)  # an item newer than the catalogue scored gets no share
    nxt = np.where(nxt < n_ids, nxt, 0)  # its weight is 0 at column 0, dropped with the zero totals
    weighted = np.where(ok, w[np.minimum(lags, order) - 1] * counts, 0)  # (E,) w(lag) · count
    starts = np.cumsum(lengths) - lengths
    index = {a: k for k, a in enumerate(keys)}
    k = np.asarray([index[int(a)] for a in query_recent[q_row, q_slot]], np.int64)  # (S,) row of each slot
    per_slot = lengths[k]
    slot = np.repeat(np.arange(q_row.size), per_slot)  # (T,) the slot of each (slot, entry) pair
    entry = starts[k][slot] + np.arange(slot.size) - np.repeat(np.cumsum(per_slot) - per_slot, per_slot)
    cells = q_row[slot] * n_ids + nxt[entry]
    code, inverse = np.unique(cells, return_inverse=True)
    # (U, order): each cell's share per query position; integers, so any summation order is exact
    cell_position = inverse * order + q_slot[slot]
    total = np.bincount(cell_position, weighted[entry].astype(np.float64), minlength=code.size * order)
    total = total.reshape(code.size, order)
    nonzero = total.sum(1) > 0
    return _pack(code[nonzero] // n_ids, code[nonzero] % n_ids, total[nonzero], len(query_recent))


def weigh_from(shares: PositionShares, first: int, weight: float) -> PositionShares:
    """The shares with the part of every item ≥ ``first`` multiplied by ``weight``: the service's items
    registered after training (model.catalogue), whose counts cover only the time since they first
    appeared while a trained item's cover the whole bank. Items below ``first`` keep their exact
    shares; ``weight`` 1 returns ``shares`` itself."""
    if weight == 1.0:
        return shares
    scale = torch.where(shares.items >= first, weight, 1.0).to(shares.values.dtype)
    return PositionShares(shares.items, shares.values * scale[..., None])


def mix(scores: Tensor, shares: Shares, transitions: TransitionMix) -> Tensor:
    """Model scores (B, n_ids) (column 0 = −inf) and the queries' shares → the log of the mixed
    distribution (B, n_ids) float32; the scores as they are when the channel is off. A row without any
    share keeps the model's order.

    Only the items with a share change beyond the shift every item gets, so they are computed on the
    (B, M) share slots and scattered in (as model.vote.mix does): two passes over the catalogue, which
    matters on the request path."""
    if not transitions.on:
        return scores
    lam = transitions.weight
    scores = scores.float()
    # log((1 − λ) · softmax(scores)) for every item: the final score of the items without a share
    base = scores - (torch.logsumexp(scores, dim=-1, keepdim=True) - math.log1p(-lam))
    total = shares.values.sum(1, keepdim=True).clamp_min(1.0)
    q = (shares.values / total).float()  # (B, M) p_trans at the share slots, 0 at padding
    # log((1−λ)p + λq) at the share slots; padding slots (item 0, q = 0) rewrite the padding column's
    # −inf with −inf
    mixed = torch.logaddexp(base.gather(1, shares.items), torch.log(lam * q))
    return base.scatter_(1, shares.items, mixed)  # base is this call's own tensor


@dataclass
class TuneResult:
    best: TransitionMix
    table: list[dict[str, Any]] = field(default_factory=list)  # every candidate's validation metrics
    z: float = 0.0  # the winner's paired NDCG@10 gain over off in standard errors
    candidate: TransitionMix | None = None  # the validation winner, kept or refused (None: off won)


Batch = tuple[Tensor, Mapping[int, Shares], Tensor]  # scores (B, n_ids), shares per order, targets (B,)


@torch.inference_mode()
def tune(
    batches: Iterable[Batch],
    orders: Sequence[int] = ORDERS,
    weights: Sequence[float] = WEIGHTS,
    metric: str = "ndcg@10",
    guard: str | None = "hr@10",
    min_z: float = 2.0,
    ks: tuple[int, ...] = KS,
) -> TuneResult:
    """The order and λ among ``orders`` × ``weights``, and off, on the same validation batches
    (unmasked; each batch holds the queries' shares at every one of ``orders``): the best ``metric``
    among the candidates whose ``guard`` is at least off's and whose paired gain over off is at least
    ``min_z`` standard errors; off when none is. The order matters on the sparse data: on Beauty the
    last two items (order 2) beat the last five in validation and in test (reports/transition_mix).
    Unlike the vote's rule (model.vote.tune), a winner that is not significant gives way to the best
    that is: the heaviest λ often wins validation by a little more with far more spread (ml-100k seed
    2: λ 0.99 at 0.8 standard errors over λ 0.5 at 2.4). ``candidate`` is the validation winner among
    the guarded ones, z the chosen one's (or, when off is chosen, the winner's)."""
    cands = [TransitionMix(0.0, max(orders)), *(TransitionMix(w, o) for o in orders for w in weights)]
    ranks: list[list[np.ndarray]] = [[] for _ in cands]
    for scores, shares, targets in batches:
        for j, c in enumerate(cands):  # off (order max(orders)) comes back as the scores themselves
            ranks[j].append(target_ranks(mix(scores, shares[c.order], c), targets).cpu().numpy())
    flat = [np.concatenate(r) if r else np.zeros(0, np.int64) for r in ranks]
    table = [{**c.to_json(), **metrics_from_ranks(r, ks)} for c, r in zip(cands, flat, strict=True)]
    z = [0.0] + [paired_z(flat[j], flat[0], metric) for j in range(1, len(cands))]
    for row, zj in zip(table, z, strict=True):
        row["z"] = zj if math.isfinite(zj) else None
    chosen, winner = choose(table, z, metric, guard, min_z)
    return TuneResult(cands[chosen], table, z[chosen or winner], cands[winner] if winner else None)


def choose(
    table: Sequence[dict[str, Any]], z: Sequence[float], metric: str, guard: str | None, min_z: float
) -> tuple[int, int]:
    """(chosen, winner) rows of :func:`tune`'s table, row 0 = off: the winner is the best ``metric``
    that beats off with ``guard`` no lower than off's (0: none); the chosen one the best such row whose
    gain is also at least ``min_z`` standard errors (0: none)."""
    better = [
        j
        for j in range(1, len(table))
        if table[j][metric] > table[0][metric] and (guard is None or table[j][guard] >= table[0][guard])
    ]

    def best_of(js: list[int]) -> int:
        return max(js, key=lambda j: (table[j][metric], -j)) if js else 0

    return best_of([j for j in better if z[j] >= min_z]), best_of(better)
