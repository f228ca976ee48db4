"""Items the model was not trained on: registered by the memory store after training (ids past the
model's vocabulary, n_items + 1, …), recommendable at once.

The transition channel and the memory vote read item ids, not embeddings: a new item comes through
them from its first interactions (it follows other items; memories name it as their next item). The
encoder and the fusion read embeddings, so a new item gets one derived from what is known of it: the
embeddings of the known items that came just before it in the memories, each weighted as the transition
channel weighs a predecessor (count · 1/lag)::

    e_b = Σ_a w(lag) · count(a → b at lag) · e_a  /  Σ_a w(lag) · count(a → b at lag)

so that a state which scores b's usual predecessors high scores b too, and the derivation follows
the counts as they grow. SASRec ties its input and output tables, so the same vector would serve as
an input; the encoder still reads only the items it was trained on (model.predictor.Predictor.known).
A new item that no known item precedes yet has no embedding (NaN): only the vote and the channel
bring it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from model import transitions as tr


def derived_embeddings(
    item_emb: Tensor,
    predecessors: Sequence[tr.Row],
    order: int = tr.MAX_ORDER,
    known: np.ndarray | None = None,
) -> Tensor:
    """The item table (n_ids, D) and each new item's predecessor rows (items before it, lags, counts)
    → (m, D) float32 embeddings, NaN rows for the items without a known predecessor. ``known`` (n_ids,)
    bool marks the rows of the table that hold a trained embedding (default: all but row 0)."""
    n_ids, dim = item_emb.shape
    if known is None:
        known = np.arange(n_ids) > 0
    out = torch.full((len(predecessors), dim), float("nan"), dtype=torch.float32)
    w = tr.lag_weights(order)
    for j, (before, lags, counts) in enumerate(predecessors):
        ok = np.zeros(len(before), bool)  # a trained embedding, at a lag the channel counts
        inside = before < n_ids
        ok[inside] = known[before[inside]] & (lags[inside] <= order)
        if not ok.any():
            continue
        weights = torch.from_numpy((w[lags[ok] - 1] * counts[ok]).astype(np.float64))
        rows = item_emb[torch.from_numpy(before[ok].astype(np.int64))].double()  # (p, D)
        out[j] = (weights @ rows / weights.sum()).float()
    return out


def predecessor_rows(items: np.ndarray, recent: np.ndarray, of: Sequence[int]) -> list[tr.Row]:
    """For each item of ``of``, the items before it in the pairs with next items ``items`` (N,) and
    prefixes ending in ``recent`` (N, width): (items before, lags, counts), as the store's
    ``predecessors`` gives them for a live bank."""
    width = recent.shape[1]
    out: list[tr.Row] = []
    for b in of:
        rows = recent[items == b]  # (r, width)
        lag = np.broadcast_to(np.arange(1, width + 1), rows.shape)
        present = rows > 0
        code, counts = np.unique(rows[present] * (width + 1) + lag[present], return_counts=True)
        out.append((code // (width + 1), code % (width + 1), counts))
    return out
