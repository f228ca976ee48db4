"""Why each item is recommended: the probability mass each source gives it (the fused model, the
memory vote, the transition channel), the fused memories that name it, the user's recent items it
follows and its rank by the plain encoder. Computed for the rows that ask (``explain``) from what the
predictor already scored (model.predictor.Scored); the answer without it costs nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from model import transitions as tr
from model import vote as vt

if TYPE_CHECKING:  # the predictor calls this module: its types only for the checker
    from model.predictor import Plan, Predictor, Scored

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Why:
    """Why an item is recommended: each source's probability mass and where it came from."""

    encoder_rank: int  # 1-based, by the plain encoder state (no memories)
    model: float  # the fused model's share of exp(score)
    vote: float  # the memory vote's
    transitions: float  # the transition channel's
    memory_cols: tuple[int, ...]  # the fusion's memories (candidate columns) whose next item it is
    follows: tuple[tuple[int, float], ...]  # (recent item, its share of the item's transition mass)


def explain_row(
    predictor: Predictor,
    plan: Plan,
    scored: Scored,
    row: int,
    items: IntArray,
    rows: Mapping[int, tr.Row] | None,
) -> tuple[Why, ...]:
    """Each ranked item's sources in probability: exp(score) = model + vote + transitions when the
    vote or the channel is on (the scores are then log-probabilities); with both off, ``model`` is
    the softmax probability of the fused logits. Under the learned hybrid (model.hybrid) the score is
    no mixture: ``model`` and ``vote`` are then the model's probability as the hybrid reads it and
    ``transitions`` the channel's distribution, the evidence it weighs."""
    vote, mix = predictor.cfg.vote, predictor.cfg.transitions
    width = scored.logits.shape[1]
    ids = torch.from_numpy(items).to(scored.logits.device)
    p_model = torch.softmax(scored.logits[row].double(), dim=-1)
    w = vote.weight if scored.voters is not None else 0.0
    m_model, m_vote = (1 - w) * p_model, torch.zeros_like(p_model)  # exp of the vote's scores
    if scored.voters is not None:
        v_items, v_sims = (t[row : row + 1] for t in scored.voters)
        m_vote = w * vt.distribution(v_items, v_sims.float(), vote.temperature, width)[0].double()
    m_trans = torch.zeros_like(p_model)
    if scored.shares is not None:  # the channel renormalises the vote's scores: a row without
        # voters sums to 1 − w there
        lam = mix.weight if predictor.cfg.hybrid is None else 1.0
        scale = (1 - lam) / float((m_model + m_vote).sum())
        if predictor.cfg.hybrid is None:
            m_model, m_vote = m_model * scale, m_vote * scale
        dense = scored.shares.dense(width)[row]
        m_trans = lam * dense / dense.sum().clamp_min(1.0)
    plain = predictor.encoder.scores(torch.from_numpy(plan.states[row : row + 1]))[0]
    known = ids < len(plain)  # a new item has no rank of the plain encoder's: after all the others
    mine = torch.where(known, plain[ids.clamp(max=len(plain) - 1)], -math.inf)
    enc_rank = torch.where(known, (plain[None, :] > mine[:, None]).sum(1) + 1, len(plain))
    follows = (
        _follows(plan.recent[row], items, rows, predictor.cfg.transition_order)
        if scored.shares is not None
        else {}
    )
    out = []
    for j, item in enumerate(items.tolist()):
        trans = float(m_trans[item])
        mem_cols: tuple[int, ...] = ()
        if scored.memories is not None:
            hit = scored.memories.present[row] & (scored.memories.items[row] == item)
            mem_cols = tuple(int(c) for c in scored.memories.cols[row][hit])
        parts = follows.get(item, {})
        total = sum(parts.values())
        out.append(
            Why(
                encoder_rank=int(enc_rank[j]),
                model=float(m_model[item]),
                vote=float(m_vote[item]),
                transitions=trans,
                memory_cols=mem_cols,
                follows=tuple((a, c / total) for a, c in parts.items()) if total else (),
            )
        )
    return tuple(out)


def _follows(
    recent: IntArray, items: IntArray, rows: Mapping[int, tr.Row] | None, order: int
) -> dict[int, dict[int, float]]:
    """item → {recent item: its weighted transition count to the item} for the ranked items."""
    w = tr.lag_weights(order)
    wanted = set(items.tolist())
    out: dict[int, dict[int, float]] = {}
    for j, a in enumerate(recent[:order].tolist()):
        if a <= 0 or rows is None or a not in rows:
            continue
        nxt, lags, counts = rows[a]
        for b, lag, c in zip(nxt.tolist(), lags.tolist(), counts.tolist(), strict=True):
            if b in wanted and lag <= order:
                parts = out.setdefault(b, {})
                parts[a] = parts.get(a, 0.0) + float(w[j] * w[lag - 1] * c)
    return out
