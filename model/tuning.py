"""Validation tuning of a fine-tuned model: the memory vote (model.vote), then the transition channel
(model.transitions). Each returns its candidates' validation metrics and the chosen value; the caller
builds the new inference config from it, nothing is changed in place.

The scores come from the predictor itself (model.predictor), batch by batch in the evaluator's batch
size, so the chosen values are the ones the served model ranks with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from model import hybrid as hy
from model import offline
from model import transitions as tr
from model import vote as vt
from model.data import Samples
from model.evaluate import target_ranks
from model.memory import MemoryBank
from model.predictor import Predictor

log = logging.getLogger(__name__)

BATCH = 1024  # queries per scoring batch, the fine-tuning batch size (the same numbers as training saw)


def _batches(samples: Samples, batch_size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(samples), batch_size):
        yield np.arange(s, min(s + batch_size, len(samples)))


def tune_vote(
    predictor: Predictor,
    bank: MemoryBank,
    queries: offline.Queries,
    samples: Samples,
    grid: vt.VoteGrid,
    min_z: float = 2.0,
    batch_size: int = BATCH,
) -> vt.TuneResult:
    """Every vote of ``grid`` over the predictor's fused logits on ``samples`` (validation; the bank
    holds the training pairs); the fused logits are computed once per batch and shared by the
    candidates. ``result.best`` is the vote to serve."""
    t0 = time.perf_counter()
    dev = predictor.encoder.item_emb.weight.device
    voters = offline.nearest(predictor, bank, queries.plan, grid.max_depth)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        for idx in _batches(samples, batch_size):
            q = queries.batch(idx)
            logits = predictor.score(q.plan, q.hits, None, user_items=q.user_items).logits
            items, sims = predictor.voters(q.plan, voters.subset(idx), grid.max_depth)
            yield logits, items.to(dev), sims.to(dev), torch.from_numpy(samples.targets[idx]).to(dev)

    with torch.inference_mode():
        result = vt.tune(batches(), grid, min_z=min_z)
    _log_vote(result, grid, min_z, time.perf_counter() - t0)
    return result


def tune_transitions(
    predictor: Predictor,
    queries: offline.Queries,
    samples: Samples,
    rows: Mapping[int, tr.Row],
    min_z: float = 2.0,
    batch_size: int = BATCH,
    orders: Sequence[int] = tr.ORDERS,
) -> tr.TuneResult:
    """The order and λ of the transition channel on ``samples`` (validation) over the predictor's
    scores with its vote, ``rows`` being the follower rows of the training pairs (at the largest of
    ``orders``). ``result.best`` is the channel to serve."""
    t0 = time.perf_counter()
    dev = predictor.encoder.item_emb.weight.device

    def batches() -> Iterator[tr.Batch]:
        for idx in _batches(samples, batch_size):
            q = queries.batch(idx)
            scores = predictor.score(q.plan, q.hits, None, q.voters, q.user_items).scores
            wanted = offline.wanted_rows(rows, q.plan)
            shares = {o: predictor.shares(q.plan.recent, wanted, order=o).to(dev) for o in orders}
            yield scores, shares, torch.from_numpy(samples.targets[idx]).to(dev)

    with torch.inference_mode():
        result = tr.tune(batches(), orders, min_z=min_z)
    _log_transitions(result, min_z, time.perf_counter() - t0)
    return result


def tune_hybrid(
    predictor: Predictor,
    queries: offline.Queries,
    samples: Samples,
    rows: Mapping[int, tr.Row],
    channel: tr.TransitionMix,
    min_z: float = 2.0,
    batch_size: int = BATCH,
) -> hy.TuneResult:
    """The learned hybrid (model.hybrid) over the predictor's scores with its vote on ``samples``
    (validation), against ``channel`` (the tuned transition channel, or off); ``rows`` are the follower
    rows of the training pairs at order MAX_ORDER. ``result.best`` is the hybrid to serve, or None."""
    t0 = time.perf_counter()

    def batches() -> Iterator[hy.Batch]:
        return hybrid_batches(predictor, queries, samples, rows, batch_size=batch_size)

    with torch.inference_mode():
        channel_ranks = [
            target_ranks(tr.mix(scores, shares.combined(), channel), targets).cpu().numpy()
            for scores, shares, _, targets in hybrid_batches(
                predictor, queries, samples, rows, channel.order, batch_size
            )
        ]
        result = hy.tune(batches, np.concatenate(channel_ranks), min_z=min_z)
    _log_hybrid(result, min_z, time.perf_counter() - t0)
    return result


def hybrid_batches(
    predictor: Predictor,
    queries: offline.Queries,
    samples: Samples,
    rows: Mapping[int, tr.Row],
    order: int = tr.MAX_ORDER,
    batch_size: int = BATCH,
) -> Iterator[hy.Batch]:
    """What the hybrid reads of ``samples``, batch by batch: the predictor's scores with its vote, the
    position shares at ``order``, the windows and the targets."""
    dev = predictor.encoder.item_emb.weight.device
    for idx in _batches(samples, batch_size):
        q = queries.batch(idx)
        scores = predictor.score(q.plan, q.hits, None, q.voters, q.user_items).scores
        shares = predictor.position_shares(q.plan.recent, offline.wanted_rows(rows, q.plan), order=order)
        window = torch.from_numpy(q.plan.window).to(dev)
        yield scores, shares.to(dev), window, torch.from_numpy(samples.targets[idx]).to(dev)


def _log_vote(result: vt.TuneResult, grid: vt.VoteGrid, min_z: float, seconds: float) -> None:
    best, cand = result.best, result.candidate
    off, chosen = result.table[0], result.table[grid.votes().index(best)]
    verdict = (
        "no vote beat off"
        if cand is None
        else f"{'kept' if cand == best else 'refused'} weight {cand.weight:.2f} temperature "
        f"{cand.temperature:.2f} depth {cand.depth}: gain {result.z:.1f} standard errors, needs {min_z:.1f}"
    )
    log.info(
        "memory vote: weight %.2f temperature %.2f depth %d; valid ndcg@10 %.4f hr@10 %.4f "
        "(off: %.4f, %.4f; %s); %d tried in %.0fs",
        best.weight,
        best.temperature,
        best.depth,
        chosen["ndcg@10"],
        chosen["hr@10"],
        off["ndcg@10"],
        off["hr@10"],
        verdict,
        len(result.table),
        seconds,
    )


def _log_transitions(result: tr.TuneResult, min_z: float, seconds: float) -> None:
    best, cand = result.best, result.candidate
    off = result.table[0]
    chosen = next(r for r in result.table if (r["weight"], r["order"]) == (best.weight, best.order))
    if cand is None:
        verdict = "none beat off"
    elif not best.on:
        verdict = f"refused λ {cand.weight:g} order {cand.order}: gain {result.z:.1f} standard errors, "
        verdict += f"needs {min_z:.1f}"
    else:
        verdict = f"kept: gain {result.z:.1f} standard errors, needs {min_z:.1f}"
        if cand != best:
            verdict += f"; λ {cand.weight:g} order {cand.order} won validation without a significant gain"
    log.info(
        "transition channel: λ %g order %d; valid ndcg@10 %.4f hr@10 %.4f (off: %.4f, %.4f; %s) in %.0fs",
        best.weight,
        best.order,
        chosen["ndcg@10"],
        chosen["hr@10"],
        off["ndcg@10"],
        off["hr@10"],
        verdict,
        seconds,
    )


def _log_hybrid(result: hy.TuneResult, min_z: float, seconds: float) -> None:
    channel, flat, gated = result.table
    hybrid = gated if result.gated else flat
    log.info(
        "learned hybrid: %s, %s gates (gates' gain %.1f standard errors); valid ndcg@10 %.4f hr@10 %.4f "
        "cross-fitted (channel: %.4f, %.4f; gain %.1f standard errors, needs %.1f) in %.0fs",
        "kept" if result.best is not None else "refused",
        "with" if result.gated else "without",
        result.z_gates,
        hybrid["ndcg@10"],
        hybrid["hr@10"],
        channel["ndcg@10"],
        channel["hr@10"],
        result.z,
        min_z,
        seconds,
    )
