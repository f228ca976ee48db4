"""The learned hybrid: how much to trust the model and each part of the transition evidence, per item.

The fixed channel (model.transitions.mix) mixes one distribution of transitions into the model's with
one global λ. The hybrid scores every item with a linear function of what each source says about it,
whose weights may depend on the query::

    score(v) = Σ_f a_f(q) · x_f(v),        a(q) = w + U · ĝ(q)

    x(v) = [ log p_model(v),                    the model's log-probability (fused, with the vote)
             log(1 + S_1(v)) … log(1 + S_5(v)),  S_j = Σ_k count_k(q_j → v) / k: what followed the
                                                 query's j-th most recent item, within five steps
             p_trans(v),                         the channel's distribution at order 5
             seen(v), last(v) ]                  v is in the query's window / is its last item
    ĝ(q) = standardised [ entropy of p_model,    how sure the model is (RAMRec's signal)
                          log(1 + Σ_v S_1(v)),   how much transition evidence the last item has
                          log(window length) ]

With the gates U, each source's trust can move with the query: with how sure the model is, how much the
last item's followers have been seen, how long the history is. w and U are fitted on the validation
queries by the listwise softmax over candidate items (the model's top items, every item with a share
and the window's items). Two forms are cross-fitted on validation (:func:`tune`): without gates (U = 0)
and with them. The gates are kept only if they beat the form without them out of sample by the
channel's rule (z ≥ ``min_z``, HR@10 no lower), and the chosen form replaces the tuned channel only by
the same rule. On the archived encoders of Beauty, Sports, ml-100k and Toys the gates never won
(reports/hybrid.md), and in a live service, where users arrive with short histories and follower counts
grow, gates fitted on one validation query per user did worse than the channel; so the hybrid mostly
ships without them (one Beauty product default of six kept them). A gated hybrid clips its query
features to the range it was fitted on rather than extrapolate a linear gate. On the archived Beauty
encoders the hybrid lifted test NDCG@10 from the tuned channel's 0.0530 to 0.0618 (3 seeds). Much of
that is the seen feature: an item already in the user's window is rarely the next one, which the
channel cannot say.

The scores are computed sparsely, as the channel's are: the model's term over the catalogue, the
transition terms on the share slots and the seen terms on the window, scattered in. Items with neither
keep the model's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model import transitions as tr
from model.evaluate import KS, metrics_from_ranks, target_ranks
from model.vote import paired_z

FEATURES = ("model", *(f"share_{j}" for j in range(1, tr.MAX_ORDER + 1)), "channel", "seen", "last")
QUERY_FEATURES = ("entropy", "mass", "length")
_SHARE = slice(1, 2 + tr.MAX_ORDER)  # the features on the share slots: the positions and the channel
_SCALE = float(math.lcm(*range(1, tr.MAX_ORDER + 1)))  # lag weights are integers lcm / k
CANDIDATES = 300  # items per validation query the fit ranks among
CHUNK = 256  # queries per dense feature pass while fitting (B × n_ids × F floats)


@dataclass(frozen=True)
class Hybrid:
    """The fitted weights, for the raw features (:data:`FEATURES`) and standardised query features."""

    weights: tuple[float, ...]  # (F,) w
    gates: tuple[tuple[float, ...], ...]  # (Q, F) U: how each query feature moves each weight
    query_mean: tuple[float, ...]  # (Q,)
    query_std: tuple[float, ...]  # (Q,)
    query_low: tuple[float, ...]  # (Q,) the lowest value of each query feature the fit saw
    query_high: tuple[float, ...]  # (Q,) and the highest: a query is clipped to [low, high]

    def __post_init__(self) -> None:
        f, q = len(FEATURES), len(QUERY_FEATURES)
        if len(self.weights) != f or len(self.gates) != q or any(len(g) != f for g in self.gates):
            raise ValueError(f"a hybrid has {f} weights and {q}×{f} gates")
        if any(len(v) != q for v in (self.query_mean, self.query_std, self.query_low, self.query_high)):
            raise ValueError(f"a hybrid standardises and clips {q} query features")
        if any(lo > hi for lo, hi in zip(self.query_low, self.query_high, strict=True)):
            raise ValueError("a hybrid's query range has its low above its high")

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": list(self.weights),
            "gates": [list(g) for g in self.gates],
            "query_mean": list(self.query_mean),
            "query_std": list(self.query_std),
            "query_low": list(self.query_low),
            "query_high": list(self.query_high),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Hybrid:
        """A hybrid saved before the query range was recorded reads its gates unclipped, as it did."""
        q = len(QUERY_FEATURES)
        return cls(
            tuple(map(float, data["weights"])),
            tuple(tuple(map(float, g)) for g in data["gates"]),
            tuple(map(float, data["query_mean"])),
            tuple(map(float, data["query_std"])),
            tuple(map(float, data.get("query_low", [-math.inf] * q))),
            tuple(map(float, data.get("query_high", [math.inf] * q))),
        )

    @cached_property
    def _tensors(self) -> tuple[Tensor, ...]:
        """w (F,), U (Q, F), the query features' mean, std, low and high (Q,): built once, read per
        batch."""
        values = (self.weights, self.gates, self.query_mean, self.query_std, self.query_low, self.query_high)
        return tuple(torch.tensor(v) for v in values)

    @cached_property
    def gated(self) -> bool:
        """Whether any weight moves with the query (else :func:`score` skips the query features)."""
        return any(g != 0.0 for row in self.gates for g in row)

    def coefficients(self, query: Tensor) -> Tensor:
        """Query features (B, Q) → each query's weights a(q) (B, F), the features clipped to the fitted
        range first: a linear gate is not extrapolated."""
        w, gates, mean, std, low, high = (t.to(query.device, query.dtype) for t in self._tensors)
        return w + ((query.clamp(low, high) - mean) / std) @ gates


# --- features --------------------------------------------------------------------------------------


def log_model(scores: Tensor) -> Tensor:
    """(B, n) model scores (−inf: never) → log p_model (B, n) float32."""
    return torch.log_softmax(scores.float(), dim=-1)


def model_term(logp: Tensor) -> Tensor:
    """The model's feature, finite: log p_model, and for an item the model cannot score (no embedding
    yet: a new item, model.catalogue) the row's lowest finite value, so that its transitions alone
    lift it (the channel's mixture does the same)."""
    floor = logp.masked_fill(~torch.isfinite(logp), math.inf).amin(1, keepdim=True)
    return torch.where(torch.isfinite(logp), logp, floor)


def share_features(shares: tr.PositionShares) -> Tensor:
    """(B, M, MAX_ORDER + 1) float32 at the share slots: log(1 + S_j) per position, then p_trans; 0 at
    padding."""
    if shares.order != tr.MAX_ORDER:
        raise ValueError(f"the hybrid reads shares at order {tr.MAX_ORDER}, got {shares.order}")
    per_position = torch.log1p(shares.values / _SCALE)
    combined = shares.combined().values
    channel = combined / combined.sum(1, keepdim=True).clamp_min(1.0)
    return torch.cat([per_position, channel[..., None]], dim=-1).float()


def query_features(logp: Tensor, shares: tr.PositionShares, window: Tensor) -> Tensor:
    """(B, Q) float32: :data:`QUERY_FEATURES` of each query."""
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(1)  # 0 · −inf counts 0
    mass = torch.log1p(shares.values[..., 0].sum(1) / _SCALE).float()
    length = torch.log((window > 0).sum(1).clamp_min(1).float())
    return torch.stack([entropy, mass, length], dim=1)


def seen_mask(window: Tensor, width: int) -> Tensor:
    """(B, width) float32: 1 where the item is in the query's window (its item ids, 0 = padding)."""
    out = torch.zeros(window.shape[0], width, device=window.device)
    out.scatter_(1, window.clamp_max(width - 1), 1.0)
    out[:, 0] = 0.0
    return out


def score(hybrid: Hybrid, scores: Tensor, shares: tr.PositionShares, window: Tensor) -> Tensor:
    """Model scores (B, n_ids) (column 0 = −inf), the queries' position shares at order MAX_ORDER and
    their windows (B, L) (most recent first, 0 = padding) → the hybrid's ranking scores (B, n_ids)
    float32; −inf at the padding column and wherever the model cannot score an item that has no
    transitions either."""
    logp = log_model(scores)
    if hybrid.gated:
        query = query_features(logp, shares, window)
    else:  # every query reads w: the entropy pass over the catalogue is not needed
        query = logp.new_zeros(len(logp), len(QUERY_FEATURES))
    a = hybrid.coefficients(query)  # (B, F)
    out = a[:, :1] * model_term(logp)
    contrib = (share_features(shares) * a[:, None, _SHARE]).sum(-1)  # (B, M), 0 at padding
    out.scatter_add_(1, shares.items, contrib)
    out += a[:, -2:-1] * seen_mask(window, out.shape[1])
    last = window[:, :1]
    out.scatter_add_(1, last, torch.where(last > 0, a[:, -1:], 0.0))
    never = ~torch.isfinite(scores)
    never.scatter_(1, shares.items, shares.values.sum(-1) <= 0)  # an item with transitions can come
    never[:, 0] = True
    return out.masked_fill(never, -math.inf)


def dense_features(scores: Tensor, shares: tr.PositionShares, window: Tensor) -> tuple[Tensor, Tensor]:
    """The same features, dense: item features (B, n_ids, F) and query features (B, Q). For fitting on
    candidates; :func:`score` never builds them."""
    logp = log_model(scores)
    b, width = logp.shape
    x = torch.zeros(b, width, len(FEATURES))
    x[..., 0] = model_term(logp)
    on_slots = share_features(shares)
    for f in range(on_slots.shape[-1]):
        x[..., 1 + f].scatter_add_(1, shares.items, on_slots[..., f])
    x[..., 0, 1:] = 0.0  # the padding slots' share features landed on column 0
    x[..., -2] = seen_mask(window, width)
    x[..., -1].scatter_(1, window[:, :1], torch.where(window[:, :1] > 0, 1.0, 0.0))
    x[:, 0, -1] = 0.0
    return x, query_features(logp, shares, window)


# --- fitting ---------------------------------------------------------------------------------------

Batch = tuple[Tensor, tr.PositionShares, Tensor, Tensor]  # scores (B, n), shares, windows (B, L), targets


@dataclass
class Candidates:
    """Validation queries' candidate items, as the fit reads them."""

    x: Tensor  # (N, C, F) item features
    query: Tensor  # (N, Q) query features
    present: Tensor  # (N, C) bool: a real candidate
    target: Tensor  # (N, C) bool: the query's target (none where the target is not a candidate)


def candidates(batches: Iterable[Batch], width: int = CANDIDATES) -> Candidates:
    """Each query's ``width`` candidates: every item with a share or in the window first, then the
    model's most probable items."""
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for scores, shares, window, targets in batches:
        for s in range(0, len(targets), CHUNK):
            rows = slice(s, s + CHUNK)
            part = tr.PositionShares(shares.items[rows], shares.values[rows])
            x, query = dense_features(scores[rows], part, window[rows])
            evidence = (x[..., _SHARE].abs().sum(-1) + x[..., -2]) > 0
            order = torch.where(evidence, 1e6, 0.0) + x[..., 0]
            order[:, 0] = -math.inf
            top = torch.topk(order, min(width, order.shape[1] - 1), dim=1).indices
            present = torch.isfinite(torch.gather(scores[rows].float(), 1, top))
            is_target = (top == targets[rows, None]) & present
            parts.append(
                (torch.gather(x, 1, top[..., None].expand(-1, -1, x.shape[-1])), query, present, is_target)
            )
    return Candidates(*(torch.cat([p[i] for p in parts]) for i in range(4)))


def fit(data: Candidates, gated: bool = True, gate_l2: float = 1e-3, max_iter: int = 200) -> Hybrid:
    """w and U by the listwise softmax over each query's candidates (queries whose target is one of
    them), L-BFGS on standardised features; returned for the raw features. ``gated=False``: U stays 0,
    one weight per feature for every query. Runs with autograd on even when called under
    ``torch.inference_mode`` (the tuning's)."""
    with torch.inference_mode(False), torch.enable_grad():
        keep = data.target.any(1)
        x, query = data.x[keep].clone(), data.query[keep].clone()
        present, target = data.present[keep].clone(), data.target[keep].clone()
        if not len(x):
            raise ValueError("no validation target is among its query's candidates: nothing to fit")
        x_std = x[present].std(0).clamp_min(1e-6)  # (F,)
        q_mean = query.mean(0)
        q_std = query.std(0).clamp_min(1e-6) if len(query) > 1 else torch.ones(query.shape[1])
        xs, qs = x / x_std, (query - q_mean) / q_std
        w = torch.zeros(len(FEATURES))
        w[0] = 1.0  # start from the model alone
        w.requires_grad_(True)
        u = torch.zeros(len(QUERY_FEATURES), len(FEATURES), requires_grad=gated)
        opt = torch.optim.LBFGS([w, u] if gated else [w], max_iter=max_iter, line_search_fn="strong_wolfe")

        def loss() -> Tensor:
            opt.zero_grad()
            a = w + qs @ u  # (N, F)
            s = (xs * a[:, None, :]).sum(-1).masked_fill(~present, -math.inf)
            logp = torch.where(target, torch.log_softmax(s, dim=1), 0.0)
            value = -logp.sum(1).mean() + gate_l2 * (u**2).sum()
            value.backward()  # type: ignore[no-untyped-call]
            return value

        opt.step(loss)  # type: ignore[no-untyped-call]
        w_raw, u_raw = (w.detach() / x_std), (u.detach() / x_std)
    return Hybrid(
        tuple(w_raw.tolist()),
        tuple(tuple(r) for r in u_raw.tolist()),
        tuple(q_mean.tolist()),
        tuple(q_std.tolist()),
        tuple(query.amin(0).tolist()),
        tuple(query.amax(0).tolist()),
    )


@dataclass
class TuneResult:
    best: Hybrid | None  # the hybrid to serve; None: the tuned channel stays
    fitted: Hybrid | None  # the chosen form fitted on all validation queries, kept or refused
    table: list[dict[str, Any]] = field(default_factory=list)  # channel, then each cross-fitted form
    z: float = 0.0  # the chosen form's paired NDCG@10 gain over the channel in standard errors
    gated: bool = False  # the chosen form has gates: they beat the same hybrid without them
    z_gates: float = 0.0  # the gates' paired NDCG@10 gain over the hybrid without them


FORMS = {False: "hybrid without gates (2-fold cross-fit)", True: "hybrid with gates (2-fold cross-fit)"}


def folds(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of ``n`` queries, fixed by ``seed``: each is scored by the hybrid fitted on the other."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def tune(
    batches: Callable[[], Iterable[Batch]],
    channel_ranks: np.ndarray,
    metric: str = "ndcg@10",
    guard: str | None = "hr@10",
    min_z: float = 2.0,
    ks: tuple[int, ...] = KS,
) -> TuneResult:
    """The hybrid against the tuned channel on the same validation queries (``channel_ranks`` (N,): the
    target's rank under the channel, or the model alone when the channel is off; ``batches()`` yields
    the validation batches anew, in that order: the scores are not held). Each half of the
    queries is ranked by the hybrid fitted on the other half, so every comparison is out of sample.

    Two forms are cross-fitted: without gates (one weight per feature) and with them. The gates are
    the larger model (Q × F more weights, fitted on one query per user), so they must earn their
    place by the channel's rule against the form without them; the chosen form is then kept over the
    channel by the same rule: a gain of at least ``min_z`` standard errors with ``guard`` no lower."""
    cands = candidates(batches())
    halves = folds(len(cands.x))
    # each half ranked by the forms fitted on the other half, in one more pass over the batches
    cross = {gated: [fit(_subset(cands, half), gated) for half in halves[::-1]] for gated in FORMS}
    ranks = _cross_ranks(cross, halves, batches)
    base = metrics_from_ranks(channel_ranks, ks)
    forms = {gated: metrics_from_ranks(r, ks) for gated, r in ranks.items()}

    def wins(
        mine: np.ndarray, other: np.ndarray, m: Mapping[str, float], o: Mapping[str, float]
    ) -> tuple[bool, float]:
        """Whether ``mine`` beats ``other`` by the rule, and its paired z (0 where it has no spread)."""
        z = paired_z(mine, other, metric)
        better = m[metric] > o[metric] and (guard is None or m[guard] >= o[guard])
        return better and math.isfinite(z) and z >= min_z, z if math.isfinite(z) else 0.0

    gated, z_gates = wins(ranks[True], ranks[False], forms[True], forms[False])
    keep, z = wins(ranks[gated], channel_ranks, forms[gated], base)
    fitted = fit(cands, gated)
    table = [{"source": "channel", **base}, *({"source": FORMS[g], **forms[g]} for g in FORMS)]
    return TuneResult(fitted if keep else None, fitted, table, z, gated, z_gates)


def _subset(c: Candidates, idx: np.ndarray) -> Candidates:
    i = torch.from_numpy(idx)
    return Candidates(c.x[i], c.query[i], c.present[i], c.target[i])


def _cross_ranks(
    fitted: Mapping[bool, list[Hybrid]],
    halves: tuple[np.ndarray, np.ndarray],
    batches: Callable[[], Iterable[Batch]],
) -> dict[bool, np.ndarray]:
    """Per form, the targets' ranks (full catalogue) of every query (N,), the queries of ``halves[i]``
    (indices over all batches) scored by that form's ``fitted[i]``: one pass over the batches."""
    n = sum(len(h) for h in halves)
    which = np.zeros(n, np.int64)
    which[halves[1]] = 1
    out, start = {form: np.zeros(n, np.int64) for form in fitted}, 0
    for scores, shares, window, targets in batches():
        for i in range(len(halves)):
            rows = np.flatnonzero(which[start : start + len(targets)] == i)
            if not rows.size:
                continue
            r = torch.from_numpy(rows)
            part = tr.PositionShares(shares.items[r], shares.values[r])
            for form, pair in fitted.items():
                ranked = target_ranks(score(pair[i], scores[r], part, window[r]), targets[r])
                out[form][start + rows] = ranked.cpu().numpy()
        start += len(targets)
    return out
