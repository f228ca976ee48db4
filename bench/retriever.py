"""Learned retriever over long-term memory: our adaptation of AutoMR (METHODS §4) to SASRec.

A user's *long-term memory* for a query is the encoder's layer-L states of that user's prefixes that
end before the query's 50-item window starts (what the window no longer shows). A memory m is *fused*
by inserting its state as an extra token in front of the window at layer L and running the upper
blocks; the state read at the last position scores the next item. Its label is how much it helps:
``δ_m = CE(without) − CE(with m)`` for the true next item, computed on a bounded candidate set (the
``candidates`` memories most similar to the query). A small MLP retriever maps the query's layer-L
state to a vector whose dot products with the candidates, softmaxed, are trained towards
``softmax(δ / τ)`` with KL divergence. The backbone stays frozen throughout.

At inference the top-k memories by each rule (similarity, random, learned) are fused together as k
tokens; queries without long-term memory keep the plain encoder state.

Research code of ``bench.learned_retriever``: the retriever did not beat similarity beyond noise, so
neither `memrec train` nor the service uses it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from model.data import Samples, Split, bucket_batches
from model.evaluate import Metrics, evaluate, head_items
from model.sasrec import SASRec

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass
class RetrieverConfig:
    layer: int = 1  # memories enter after this many encoder blocks (1 ≤ layer < n_layers)
    candidates: int = 32  # memories labelled and scored per query: the most similar ones
    k: int = 4  # memories fused at inference
    hidden: int = 128
    temperature: float = 1.0  # of the label softmax over δ (over standardised δ when ``standardise``)
    # δ is tiny on a frozen backbone (hundredths of a nat), so softmax(δ) is nearly uniform and its KL
    # gradients are small: standardise each query's δ over its candidates (z-scores), then apply τ.
    standardise: bool = True
    max_train_queries: int = 20_000  # labelling costs one upper pass per candidate: bound it
    epochs: int = 30
    patience: int = 5
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"


# ------------------------------------------------------------------------------------ the encoder


def lower_states(encoder: SASRec, samples: Samples, layer: int, device: str) -> FloatArray:
    """Layer-``layer`` states at each sample's last real position: (N, D)."""
    out = np.zeros((len(samples), encoder.cfg.dim), np.float32)
    encoder.eval()
    with torch.inference_mode():
        for idx in bucket_batches(samples.lengths, 1024, rng=None):
            x, _ = lower_window(encoder, samples, idx, layer, device)
            last = torch.from_numpy(samples.lengths[idx] - 1).to(device)
            out[idx] = x[torch.arange(len(idx), device=device), last].float().cpu().numpy()
    return out


def lower_window(
    encoder: SASRec, samples: Samples, idx: IntArray, layer: int, device: str
) -> tuple[Tensor, Tensor]:
    """The window of samples ``idx`` after ``layer`` blocks: (B, T, D), and the item ids (B, T)."""
    t = int(samples.lengths[idx].max())
    items = torch.from_numpy(samples.inputs[idx, :t]).to(device)
    x, mask = encoder.embed(items), encoder.causal_mask(items)
    for block in encoder.blocks[:layer]:
        x = block(x, mask)
    return x, items


def upper_with_memories(
    encoder: SASRec, x: Tensor, items: Tensor, lengths: Tensor, mem: Tensor, mem_mask: Tensor, layer: int
) -> Tensor:
    """Fuse memories as tokens in front of the layer-L window and read the last position.

    x: (B, T, D) layer-L window, items: (B, T) ids (0 = padding), lengths: (B,), mem: (B, M, D),
    mem_mask: (B, M) True for real memories → final states (B, D). Window positions attend to the real
    memories and causally to the window; memory positions attend to themselves only (their outputs
    are never read), so no attention row is empty.
    """
    B, T, _ = x.shape
    M = mem.shape[1]
    seq = encoder.causal_mask(items)[:, 0]  # (B, T, T)
    to_mem = mem_mask[:, None, :].expand(B, T, M)  # window rows → memory columns
    top = torch.cat([torch.eye(M, dtype=torch.bool, device=x.device).expand(B, M, M),
                     torch.zeros(B, M, T, dtype=torch.bool, device=x.device)], dim=2)  # fmt: skip
    mask = torch.cat([top, torch.cat([to_mem, seq], dim=2)], dim=1)[:, None]  # (B, 1, M+T, M+T)
    h = torch.cat([mem, x], dim=1)
    for block in encoder.blocks[layer:]:
        h = block(h, mask)
    return h[torch.arange(B, device=x.device), M + lengths - 1]


# ------------------------------------------------------------------------------- long-term memory


@dataclass
class LongTermMemory:
    """Layer-L states of every training prefix, grouped by user in prefix order (CSR)."""

    states: FloatArray  # (N, D), rows sorted by (user, prefix_len)
    prefix_lens: IntArray  # (N,)
    indptr: IntArray  # (n_users + 1,): user u's rows are indptr[u]:indptr[u + 1]

    @classmethod
    def build(cls, encoder: SASRec, train: Samples, layer: int, device: str) -> LongTermMemory:
        states = lower_states(encoder, train, layer, device)
        order = np.lexsort((train.prefix_lens, train.users))
        n_users = int(train.users.max()) + 2
        indptr = np.zeros(n_users + 1, np.int64)
        np.add.at(indptr, train.users[order] + 1, 1)
        return cls(states[order], train.prefix_lens[order], np.cumsum(indptr))

    def of(self, user: int, prefix_len: int, window: int) -> IntArray:
        """Rows of ``user``'s memories older than a window of ``window`` items before ``prefix_len``."""
        if user + 1 >= len(self.indptr):
            return np.zeros(0, np.int64)
        lo, hi = int(self.indptr[user]), int(self.indptr[user + 1])
        cut = lo + int(np.searchsorted(self.prefix_lens[lo:hi], prefix_len - window, side="right"))
        return np.arange(lo, cut, dtype=np.int64)


def candidate_rows(
    memory: LongTermMemory, queries: FloatArray, samples: Samples, window: int, c: int
) -> IntArray:
    """(N, c) rows of each query's ``c`` most similar long-term memories (cosine), -1 padded."""
    out = np.full((len(samples), c), -1, np.int64)
    unit = memory.states / np.maximum(np.linalg.norm(memory.states, axis=1, keepdims=True), 1e-12)
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    for i in range(len(samples)):
        rows = memory.of(int(samples.users[i]), int(samples.prefix_lens[i]), window)
        if rows.size:
            sims = unit[rows] @ q[i]
            top = rows[np.argsort(-sims, kind="stable")[:c]]
            out[i, : top.size] = top
    return out


# ------------------------------------------------------------------------------------ the labels


def fusion_labels(
    encoder: SASRec, samples: Samples, memory: LongTermMemory, cand: IntArray, layer: int, device: str
) -> FloatArray:
    """δ (N, c): CE of the target without memory minus CE with each single candidate; NaN at padding."""
    out = np.full(cand.shape, np.nan, np.float32)
    c = cand.shape[1]
    encoder.eval()
    with torch.inference_mode():
        for idx in tqdm(
            bucket_batches(samples.lengths, 64, rng=None), desc="labels", leave=False, mininterval=2.0
        ):
            x, items = lower_window(encoder, samples, idx, layer, device)
            lengths = torch.from_numpy(samples.lengths[idx]).to(device)
            targets = torch.from_numpy(samples.targets[idx]).to(device)
            B, D = len(idx), x.shape[2]
            none = upper_with_memories(encoder, x, items, lengths, x.new_zeros(B, 1, D),
                                       torch.zeros(B, 1, dtype=torch.bool, device=device), layer)  # fmt: skip
            ce0 = F.cross_entropy(encoder.scores(none), targets, reduction="none")  # (B,)
            rows = cand[idx]  # (B, c)
            mem = torch.from_numpy(memory.states[np.maximum(rows, 0)]).to(device)  # (B, c, D)
            # Each (query, candidate) pair is one sequence with one memory token: (B·c, ...).
            fused = upper_with_memories(
                encoder,
                x.repeat_interleave(c, 0),
                items.repeat_interleave(c, 0),
                lengths.repeat_interleave(c, 0),
                mem.reshape(B * c, 1, D),
                torch.ones(B * c, 1, dtype=torch.bool, device=device),
                layer,
            )
            ce = F.cross_entropy(encoder.scores(fused), targets.repeat_interleave(c, 0), reduction="none")
            delta = (ce0.repeat_interleave(c, 0) - ce).view(B, c).float().cpu().numpy()
            out[idx] = np.where(rows >= 0, delta, np.nan)
    return out


# --------------------------------------------------------------------------------- the retriever


class Retriever(nn.Module):
    """Query state (B, D) → a vector whose dot products with candidate memories rank them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, query: Tensor, mem: Tensor, mask: Tensor) -> Tensor:
        """query (B, D), mem (B, c, D), mask (B, c) → log-probabilities over candidates (B, c)."""
        logits = torch.einsum("bd,bcd->bc", self.mlp(query), mem) / math.sqrt(query.shape[1])
        return F.log_softmax(logits.masked_fill(~mask, -1e9), dim=1)


def kl_to_labels(log_s: Tensor, delta: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """Mean over queries of KL(softmax(δ/τ) ‖ s) on the real candidates."""
    target = F.softmax((delta / temperature).masked_fill(~mask, -1e9), dim=1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_s)).masked_fill(~mask, 0.0).sum(1)
    return kl.mean()


@dataclass
class Labelled:
    queries: FloatArray  # (N, D) layer-L query states
    cand: IntArray  # (N, c)
    delta: FloatArray  # (N, c), NaN at padding


def train_retriever(
    memory: LongTermMemory, train: Labelled, valid: Labelled, dim: int, cfg: RetrieverConfig
) -> tuple[Retriever, list[float]]:
    """Fit the retriever on labelled train queries; keep the epoch with the lowest validation KL."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = Retriever(dim, cfg.hidden).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_state, bad, history = math.inf, None, 0, []
    everything = np.arange(len(valid.cand))
    for _ in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(train.cand))
        for s in range(0, len(order), cfg.batch_size):
            loss = kl_to_labels(
                *_batch(model, memory, train, order[s : s + cfg.batch_size], cfg), cfg.temperature
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        model.eval()
        with torch.no_grad():
            kl = float(kl_to_labels(*_batch(model, memory, valid, everything, cfg), cfg.temperature))
        history.append(kl)
        if kl < best:
            best, bad = kl, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def _batch(
    model: Retriever, memory: LongTermMemory, data: Labelled, idx: IntArray, cfg: RetrieverConfig
) -> tuple[Tensor, Tensor, Tensor]:
    rows = data.cand[idx]
    mask = torch.from_numpy(rows >= 0).to(cfg.device)
    mem = torch.from_numpy(memory.states[np.maximum(rows, 0)]).to(cfg.device)
    log_s = model(torch.from_numpy(data.queries[idx]).to(cfg.device), mem, mask)
    d = data.delta[idx]
    if cfg.standardise:
        real = ~np.isnan(d)
        mean = np.where(real, d, 0.0).sum(1, keepdims=True) / np.maximum(real.sum(1, keepdims=True), 1)
        var = np.where(real, (d - mean) ** 2, 0.0).sum(1, keepdims=True) / np.maximum(
            real.sum(1, keepdims=True), 1
        )
        d = (d - mean) / np.maximum(np.sqrt(var), 1e-6)
    delta = torch.from_numpy(np.nan_to_num(d, nan=0.0).astype(np.float32)).to(cfg.device)
    return log_s, delta, mask


# --------------------------------------------------------------------------------- the comparison

RULES = ("none", "similarity", "random", "learned")


def select(
    rule: str,
    memory: LongTermMemory,
    samples: Samples,
    data: Labelled,
    k: int,
    window: int,
    retriever: Retriever | None,
    rng: np.random.Generator,
    device: str,
) -> IntArray:
    """(N, k) memory rows each rule fuses, -1 padded: none, the k most similar, k drawn uniformly from
    the whole long-term memory, or the retriever's top k among the candidates."""
    out = np.full((len(samples), k), -1, np.int64)
    if rule == "similarity":
        out[:, : min(k, data.cand.shape[1])] = data.cand[:, :k]
    elif rule == "random":
        for i in range(len(samples)):
            rows = memory.of(int(samples.users[i]), int(samples.prefix_lens[i]), window)
            pick = rng.choice(rows, size=min(k, rows.size), replace=False) if rows.size else rows
            out[i, : pick.size] = pick
    elif rule == "learned":
        assert retriever is not None
        with torch.no_grad():
            for s in range(0, len(samples), 1024):
                idx = np.arange(s, min(s + 1024, len(samples)))
                rows = data.cand[idx]
                mask = torch.from_numpy(rows >= 0).to(device)
                mem = torch.from_numpy(memory.states[np.maximum(rows, 0)]).to(device)
                log_s = retriever(torch.from_numpy(data.queries[idx]).to(device), mem, mask)
                top = torch.topk(log_s, min(k, rows.shape[1]), dim=1).indices.cpu().numpy()
                picked = np.take_along_axis(rows, top, 1)
                out[idx, : picked.shape[1]] = picked  # padding candidates stay -1 (they sort last)
    elif rule != "none":
        raise ValueError(f"unknown retrieval rule {rule!r}; expected one of {RULES}")
    return out


def fused_states(
    encoder: SASRec, samples: Samples, memory: LongTermMemory, rows: IntArray, layer: int, device: str
) -> FloatArray:
    """Final states (N, D) with the memories ``rows`` (N, k) fused; a row of -1 is the plain encoder."""
    out = np.zeros((len(samples), encoder.cfg.dim), np.float32)
    encoder.eval()
    with torch.inference_mode():
        for idx in bucket_batches(samples.lengths, 512, rng=None):
            x, items = lower_window(encoder, samples, idx, layer, device)
            lengths = torch.from_numpy(samples.lengths[idx]).to(device)
            r = rows[idx]
            mem = torch.from_numpy(memory.states[np.maximum(r, 0)]).to(device)
            mask = torch.from_numpy(r >= 0).to(device)
            out[idx] = upper_with_memories(encoder, x, items, lengths, mem, mask, layer).float().cpu().numpy()
    return out


def labelled(
    encoder: SASRec, samples: Samples, memory: LongTermMemory, cfg: RetrieverConfig, window: int
) -> Labelled:
    queries = lower_states(encoder, samples, cfg.layer, cfg.device)
    cand = candidate_rows(memory, queries, samples, window, cfg.candidates)
    delta = fusion_labels(encoder, samples, memory, cand, cfg.layer, cfg.device)
    return Labelled(queries, cand, delta)


def with_memory(samples: Samples, memory: LongTermMemory, window: int) -> IntArray:
    """Indices of the samples that have any long-term memory."""
    return np.asarray(
        [
            i
            for i in range(len(samples))
            if memory.of(int(samples.users[i]), int(samples.prefix_lens[i]), window).size
        ],
        np.int64,
    )


def subset_seen(seen: tuple[IntArray, IntArray], idx: IntArray) -> tuple[IntArray, IntArray]:
    """The seen-items CSR of samples ``idx``."""
    indptr, items = seen
    parts = [items[indptr[i] : indptr[i + 1]] for i in idx]
    lengths = np.asarray([p.size for p in parts], np.int64)
    new_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return new_ptr, (np.concatenate(parts) if parts else np.zeros(0, np.int64)).astype(np.int64)


def compare_rules(encoder: SASRec, split: Split, cfg: RetrieverConfig) -> dict[str, object]:
    """Label, train the retriever, and evaluate every rule on the test queries with long-term memory
    (``test``: the others are unchanged by any rule) and on the whole test set (``test_all``, with the
    head/tail split); returns those metrics, label statistics and the KL history."""
    window = encoder.cfg.max_len
    encoder.to(cfg.device)
    memory = LongTermMemory.build(encoder, split.train, cfg.layer, cfg.device)
    rng = np.random.default_rng(cfg.seed)
    train_idx = with_memory(split.train, memory, window)
    if train_idx.size > cfg.max_train_queries:
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_queries, replace=False))
    valid_idx, test_idx = (with_memory(s, memory, window) for s in (split.valid, split.test))
    if min(train_idx.size, valid_idx.size, test_idx.size) == 0:
        raise ValueError("no long-term memory: every history fits in the window (use a long-history dataset)")
    log.info(
        "queries with long-term memory: train %d, valid %d, test %d",
        train_idx.size,
        valid_idx.size,
        test_idx.size,
    )
    train = labelled(encoder, split.train.subset(train_idx), memory, cfg, window)
    valid = labelled(encoder, split.valid.subset(valid_idx), memory, cfg, window)
    retriever, history = train_retriever(memory, train, valid, encoder.cfg.dim, cfg)
    test_samples = split.test.subset(test_idx)
    test_queries = lower_states(encoder, test_samples, cfg.layer, cfg.device)
    test_cand = candidate_rows(memory, test_queries, test_samples, window, cfg.candidates)
    test = Labelled(test_queries, test_cand, np.full(test_cand.shape, np.nan, np.float32))  # no labels
    seen = subset_seen(split.test_seen, test_idx)
    head = head_items(split.train.targets, encoder.cfg.n_items)
    results: dict[str, Metrics] = {}
    whole: dict[str, Metrics] = {}
    for rule in RULES:
        rows = select(
            rule,
            memory,
            test_samples,
            test,
            cfg.k,
            window,
            retriever,
            np.random.default_rng(cfg.seed),
            cfg.device,
        )
        states = fused_states(encoder, test_samples, memory, rows, cfg.layer, cfg.device)

        def score_fn(_x: Tensor, _lengths: Tensor, idx: IntArray, states: FloatArray = states) -> Tensor:
            return encoder.scores(torch.from_numpy(states[idx]).to(cfg.device))

        results[rule] = evaluate(score_fn, test_samples, seen, device=cfg.device)
        whole[rule] = whole_test(encoder, split, test_idx, None if rule == "none" else states, head, cfg)
    real = ~np.isnan(train.delta)
    return {
        "queries": {
            "train": int(train_idx.size),
            "valid": int(valid_idx.size),
            "test": int(test_idx.size),
            "test_all": len(split.test),
        },
        "labels": {
            "mean_delta": float(np.nanmean(train.delta)),
            "positive_share": float((train.delta[real] > 0).mean()),
            "best_candidate_mean_delta": float(np.nanmax(train.delta, axis=1).mean()),
        },
        "valid_kl": history,
        "test": results,
        "test_all": whole,
    }


def whole_test(
    encoder: SASRec,
    split: Split,
    test_idx: IntArray,
    fused: FloatArray | None,
    head: npt.NDArray[np.bool_],
    cfg: RetrieverConfig,
) -> Metrics:
    """A rule on the whole test set, with the head/tail split: the queries ``test_idx`` (those with
    long-term memory) score from their ``fused`` states (len(test_idx), D), every other query from the
    plain encoder, so that the figures compare with the encoder's own test metrics. ``fused`` None is
    the encoder alone."""
    pos = np.full(len(split.test), -1, np.int64)
    pos[test_idx] = np.arange(test_idx.size)

    def score_fn(x: Tensor, lengths: Tensor, idx: IntArray) -> Tensor:
        h = encoder.encode(x, lengths)  # (B, D)
        p = pos[idx]
        if fused is not None and (p >= 0).any():
            h[torch.from_numpy(p >= 0).to(h.device)] = torch.from_numpy(fused[p[p >= 0]]).to(h.device)
        return encoder.scores(h)

    encoder.eval()
    return evaluate(score_fn, split.test, split.test_seen, device=cfg.device, head=head)
