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

from model import offline
from model import transitions as tr
from model import vote as vt
from model.data import Samples
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
