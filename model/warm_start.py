"""Starting a training run at a trained encoder, also when the item catalogue has changed since.

Retraining on the interactions the service logged (``memrec export``) brings items the encoder never
saw and may lack some it did. The encoder's weights are carried over by meaning, not by position: an
item the base model knows keeps its trained row (bit for bit) wherever the new vocabulary puts it; a
new item starts from the embedding derived from the known items that precede it in the training pairs
(model.catalogue, the same derivation the service uses before any retraining), or from the run's own
random initialisation where nothing precedes it. Everything else (positions, blocks) is copied as is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from model.catalogue import derived_embeddings, predecessor_rows
from model.data import DataError, Samples, Vocab
from model.sasrec import SASRec
from model.transitions import recent_items

log = logging.getLogger(__name__)

SHAPE = ("dim", "n_layers", "n_heads", "inner_dim", "max_len")


@dataclass(frozen=True)
class Transfer:
    kept: int  # items whose trained row was carried over
    derived: int  # new items started from their predecessors' embeddings
    fresh: int  # new items started at random (nothing known precedes them)
    dropped: int  # items of the base model the new vocabulary lacks


def transfer(base: SASRec, base_vocab: Vocab, model: SASRec, vocab: Vocab, train: Samples) -> Transfer:
    """Copy ``base``'s weights into ``model`` (same shape but for the item count), item rows by external
    id; ``train``: the new run's training pairs, for the new items' derived rows."""
    mismatched = [f for f in SHAPE if getattr(base.cfg, f) != getattr(model.cfg, f)]
    if mismatched:
        raise DataError(f"the base encoder differs in {', '.join(mismatched)}")
    state = {k: v for k, v in base.state_dict().items() if k != "item_emb.weight"}
    model.load_state_dict(state, strict=False)
    old = base.item_emb.weight.detach()
    rows = model.item_emb.weight.detach().clone()  # (n + 1, D): the run's own initialisation
    known = np.zeros(vocab.n_items + 1, bool)
    where = np.zeros(vocab.n_items + 1, np.int64)
    for i, item in enumerate(vocab.items, start=1):
        j = base_vocab._item_index.get(item)
        if j is not None:
            known[i], where[i] = True, j
    rows[known] = old[torch.from_numpy(where[known])]
    rows[0] = old[0]  # the padding row too: the same encoder when nothing changed
    new = np.flatnonzero(~known[1:]) + 1
    derived = derived_embeddings(
        rows,
        predecessor_rows(train.targets, recent_items(train.inputs, train.lengths), new.tolist()),
        known=known,
    )  # noqa: E501
    has = ~torch.isnan(derived).any(1)
    rows[torch.from_numpy(new)[has]] = derived[has].to(rows.dtype)
    with torch.no_grad():
        model.item_emb.weight.copy_(rows)
    out = Transfer(
        int(known[1:].sum()), int(has.sum()), int((~has).sum()), base_vocab.n_items - int(known.sum())
    )
    log.info("item rows: %d kept, %d derived, %d new at random, %d dropped", *vars(out).values())
    return out
