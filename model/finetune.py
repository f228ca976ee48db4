"""Stage 2 of RaSeRec: retrieval-augmented fine-tuning on top of the frozen encoder (METHODS §2).

The encoder is frozen (dropout off), so every sample's state h and its top-K retrieved memories are
computed once; an epoch then only runs the fusion module and the output layer. The memory bank holds the
training pairs while training and validating, and the training + validation pairs at test time (never
a test target). Early stopping on validation HR@10 (unmasked), the best fusion weights kept. With
``tune_vote`` the memory vote (model.vote) is then chosen on validation over the trained fusion, and
with ``tune_transitions`` the transition channel (model.transitions) over both.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model import transitions as tr
from model.adaptive import AdaptiveKConfig, adaptive_k
from model.data import IntArray, Samples, Split
from model.evaluate import Metrics, evaluate, head_items
from model.fusion import FusionConfig, RetrievalFusion
from model.memory import FloatArray, MemoryBank, Retrieved, encode_samples
from model.sasrec import SASRec
from model.train import EpochLog
from model.transitions import TransitionMix
from model.user_memory import UserMemoryConfig, UserMemoryTable, build_table
from model.vote import TuneResult, Vote, VoteGrid, mix, tune

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    k: int = 20  # memories per query
    fetch_factor: int = 4  # candidates fetched per kept memory, before the leakage rule
    epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-3
    patience: int = 10
    valid_metric: str = "hr@10"  # of the unmasked protocol
    retrieval: str = "similarity"  # or "random": uniformly drawn memories, the control
    adaptive_k: bool = False  # RAMRec's entropy rule picks K ≤ k per query
    cross_user: bool = False  # retrieve other users' memories only
    k_min: int = 3
    user_memories: bool = False  # the user's own memories (RAMRec) join the retrieved ones
    user_capacity: int = 75
    memory_quality: str = "recency_frequency"  # eviction order of the user memories
    memory_access_top: int = 5
    memory_half_life: float = 10.0  # interactions
    # The memory vote (model.vote): off at weight 0; ``tune_vote`` picks the three on validation
    # after fine-tuning (model.vote.tune: NDCG@10, HR@10 no worse than off).
    tune_vote: bool = False
    vote_weight: float = 0.0
    vote_temperature: float = 0.05
    vote_depth: int = 0
    # The transition channel (model.transitions): off at weight 0; ``tune_transitions`` picks λ on
    # validation after the vote, by the same rule.
    tune_transitions: bool = False
    transition_weight: float = 0.0
    transition_order: int = tr.MAX_ORDER
    seed: int = 0
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def adaptive(self) -> AdaptiveKConfig | None:
        return AdaptiveKConfig(k_base=self.k, k_min=self.k_min, k_max=self.k) if self.adaptive_k else None

    def vote(self) -> Vote:
        return Vote(self.vote_weight, self.vote_temperature, self.vote_depth)

    def transitions(self) -> TransitionMix:
        return TransitionMix(self.transition_weight, self.transition_order)

    def user_memory(self) -> UserMemoryConfig | None:
        if not self.user_memories:
            return None
        return UserMemoryConfig(
            self.user_capacity, self.memory_quality, self.memory_access_top, self.memory_half_life
        )


@dataclass
class Queries:
    """Frozen states of a sample set and their retrieved memories."""

    states: FloatArray  # (N, D)
    retrieved: Retrieved  # (N, K)
    user_items: IntArray | None = None  # (N, C) the user's own memories, 0 = empty; None when off
    voters: Retrieved | None = None  # (N, depth) the nearest memories for the vote; None when off
    recent: IntArray | None = None  # (N, MAX_ORDER) each query's last items, most recent first

    def subset(self, idx: IntArray) -> tuple[FloatArray, Retrieved, IntArray | None]:
        user = None if self.user_items is None else self.user_items[idx]
        return self.states[idx], Retrieved(self.retrieved.ids[idx], self.retrieved.scores[idx]), user

    def voter_subset(self, idx: IntArray) -> Retrieved | None:
        return None if self.voters is None else Retrieved(self.voters.ids[idx], self.voters.scores[idx])

    def recent_subset(self, idx: IntArray) -> IntArray | None:
        return None if self.recent is None else self.recent[idx]


@dataclass
class FinetuneResult:
    best_epoch: int
    best_valid: Metrics
    history: list[EpochLog] = field(default_factory=list)
    vote_grid: VoteGrid | None = None  # the candidates the vote was chosen from
    vote: TuneResult | None = None  # their validation metrics, the winner and its z (None: not tuned)
    transitions: tr.TuneResult | None = None  # the same for the transition channel


def limit_depth(retrieved: Retrieved, k: IntArray) -> Retrieved:
    """Keep the first k[i] memories of row i (they are in similarity order); empty the rest."""
    keep = np.arange(retrieved.ids.shape[1])[None, :] < k[:, None]
    return Retrieved(np.where(keep, retrieved.ids, -1), np.where(keep, retrieved.scores, -np.inf))


class RetrievalModel:
    """Frozen encoder + memory bank (+ the users' own memories) + fusion: scores for queries whose
    memories are retrieved. ``user_table`` holds the user-memory snapshots of the split being served
    when the fine-tune config turns user memories on."""

    def __init__(
        self,
        encoder: SASRec,
        fusion: RetrievalFusion,
        bank: MemoryBank,
        cfg: FinetuneConfig,
        user_table: UserMemoryTable | None = None,
    ) -> None:
        self.encoder = encoder
        self.fusion = fusion
        self.bank = bank
        self.cfg = cfg
        self.user_table = user_table
        self._follow: Tensor | None = None

    @property
    def follow(self) -> Tensor:
        """The bank's transitions (model.transitions.follow_matrix), built on first use."""
        if self._follow is None:
            if self.bank.recent is None:
                raise ValueError("this memory bank has no prefix items: the transition channel needs them")
            n_ids = self.encoder.cfg.n_items + 1
            self._follow = tr.follow_matrix(
                self.bank.items, self.bank.recent, n_ids, self.cfg.transition_order
            )
        return self._follow

    def use_transitions_of(self, items: IntArray, recent: IntArray) -> None:
        """Count the transitions of other memories than the bank's: next items (N,) and their prefixes'
        last items (N, MAX_ORDER), e.g. the training pairs only."""
        n_ids = self.encoder.cfg.n_items + 1
        self._follow = tr.follow_matrix(items, recent, n_ids, self.cfg.transition_order)

    def memory_tensors(
        self,
        states: Tensor,
        retrieved: Retrieved,
        user_items: IntArray | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Retrieved ids (B, K) and user memories (B, C) → keys, values (B, S, D), mask, sims (B, S)
        and the user-slot mask (B, S) or None; S = K + C, the user's slots last."""
        device = states.device
        ids = retrieved.ids
        safe = np.maximum(ids, 0)
        keys = torch.from_numpy(self.bank.unit_keys[safe]).to(device)  # normalised, as the store keeps them
        item_ids = torch.from_numpy(np.where(ids >= 0, self.bank.items[safe], 0)).to(device)
        values = self.encoder.item_emb(item_ids)  # frozen table; padding row for empty slots
        mask = torch.from_numpy(ids >= 0).to(device)
        sims = torch.from_numpy(np.where(ids >= 0, retrieved.scores, 0.0).astype(np.float32)).to(device)
        if user_items is None:
            return keys, values, mask, sims, None
        u_values = self.encoder.item_emb(torch.from_numpy(user_items).to(device))  # (B, C, D)
        u_keys = F.normalize(u_values, dim=-1)
        u_mask = torch.from_numpy(user_items > 0).to(device)
        u_sims = torch.einsum("bd,bcd->bc", F.normalize(states, dim=-1), u_keys) * u_mask
        user_slots = torch.cat([torch.zeros_like(mask), torch.ones_like(u_mask)], dim=1)
        return (
            torch.cat([keys, u_keys], dim=1),
            torch.cat([values, u_values], dim=1),
            torch.cat([mask, u_mask], dim=1),
            torch.cat([sims, u_sims], dim=1),
            user_slots,
        )

    def fused(self, states: Tensor, retrieved: Retrieved, user_items: IntArray | None = None) -> Tensor:
        """states (B, D) frozen encoder output → the fused state ĥ (B, D)."""
        keys, values, mask, sims, user_slots = self.memory_tensors(states, retrieved, user_items)
        out: Tensor = self.fusion(states, keys, values, mask, sims, user_slots)
        return out

    def logits(self, states: Tensor, retrieved: Retrieved, user_items: IntArray | None = None) -> Tensor:
        """states (B, D) frozen encoder output → the fused state's logits over all ids (B, n_items + 1)."""
        return self.encoder.scores(self.fused(states, retrieved, user_items))

    def scores(
        self,
        states: Tensor,
        retrieved: Retrieved,
        user_items: IntArray | None = None,
        voters: Retrieved | None = None,
        recent: IntArray | None = None,
    ) -> Tensor:
        """Ranking scores over all ids (B, n_items + 1): the logits; with ``voters`` and the vote on,
        the log of their mix with the voters' next items (model.vote); with ``recent`` (B, MAX_ORDER)
        and the transition channel on, mixed with the transitions of the queries' last items."""
        scores = self.logits(states, retrieved, user_items)
        vote = self.cfg.vote()
        if voters is not None and vote.on:
            scores = mix(scores, *self.voter_tensors(voters, states.device), vote)
        return self.with_transitions(scores, recent)

    def with_transitions(self, scores: Tensor, recent: IntArray | None) -> Tensor:
        mix_cfg = self.cfg.transitions()
        if recent is None or not mix_cfg.on:
            return scores
        shares = tr.shares_from_matrix(recent, self.follow, mix_cfg.order).to(scores.device)
        return tr.mix(scores, shares, mix_cfg)

    def voter_tensors(self, voters: Retrieved, device: torch.device) -> tuple[Tensor, Tensor]:
        """Voters (B, V) → their next items (B, V), 0 at empty slots, and similarities (B, V)."""
        items = np.where(voters.ids >= 0, self.bank.items[np.maximum(voters.ids, 0)], 0)
        return torch.from_numpy(items).to(device), torch.from_numpy(voters.scores).to(device)

    def nearest(self, states: FloatArray, samples: Samples, depth: int) -> Retrieved:
        """The ``depth`` most similar memories of each sample (leakage rule applied): the voters."""
        cfg = self.cfg
        return self.bank.search(
            states, samples.users, samples.prefix_lens, depth, cfg.fetch_factor, own=not cfg.cross_user
        )

    def retrieve(self, states: FloatArray, samples: Samples) -> Retrieved:
        """Top-k memories of each sample's state, cut to the adaptive depth when that is on."""
        cfg = self.cfg
        if cfg.retrieval == "random":
            rng = np.random.default_rng(cfg.seed)
            retrieved = self.bank.random(states, samples.users, samples.prefix_lens, cfg.k, rng)
        else:
            retrieved = self.bank.search(
                states, samples.users, samples.prefix_lens, cfg.k, cfg.fetch_factor, own=not cfg.cross_user
            )
        adaptive = cfg.adaptive()
        if adaptive is not None:
            # The user's memory for the entropy rule: the distinct items of the input window.
            histories = [row[:n] for row, n in zip(samples.inputs, samples.lengths, strict=True)]
            retrieved = limit_depth(retrieved, adaptive_k(self.encoder.item_emb.weight, histories, adaptive))
        return retrieved

    def queries(self, samples: Samples) -> Queries:
        states = encode_samples(self.encoder, samples, self.cfg.device)
        vote = self.cfg.vote()
        voters = self.nearest(states, samples, vote.depth) if vote.on else None
        recent = tr.recent_items(samples.inputs, samples.lengths)
        return Queries(states, self.retrieve(states, samples), self.user_items(samples), voters, recent)

    def user_items(self, samples: Samples) -> IntArray | None:
        if not self.cfg.user_memories:
            return None
        if self.user_table is None:
            raise ValueError("this model reads user memories: set user_table (model.user_memory.build_table)")
        return self.user_table.lookup(samples)


def evaluate_retrieval(
    model: RetrievalModel,
    queries: Queries,
    samples: Samples,
    seen: tuple[IntArray, IntArray],
    device: str,
    head: np.ndarray | None = None,
) -> Metrics:
    """Full-ranking metrics of the retrieval-augmented model from precomputed queries."""
    model.fusion.eval()
    dev = torch.device(device)

    def score_fn(_x: Tensor, _lengths: Tensor, idx: IntArray) -> Tensor:
        states, retrieved, user_items = queries.subset(idx)
        return model.scores(
            torch.from_numpy(states).to(dev),
            retrieved,
            user_items,
            queries.voter_subset(idx),
            queries.recent_subset(idx),
        )

    return evaluate(score_fn, samples, seen, device=device, head=head)


def build_bank(encoder: SASRec, samples: Samples, device: str) -> tuple[MemoryBank, FloatArray]:
    keys = encode_samples(encoder, samples, device)
    return MemoryBank.from_samples(keys, samples), keys


def finetune(
    encoder: SASRec,
    split: Split,
    fusion_cfg: FusionConfig,
    cfg: FinetuneConfig,
    vote_grid: VoteGrid | None = None,
    vote_min_z: float = 2.0,
) -> tuple[RetrievalModel, FinetuneResult]:
    """Train a fusion module over the frozen ``encoder``; returns the model (training-pair bank). With
    ``cfg.tune_vote`` the memory vote is then chosen from ``vote_grid`` (default: ``VoteGrid()``); it
    stays off unless it beats off on validation by ``vote_min_z`` standard errors."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = torch.device(cfg.device)
    encoder.to(dev).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)

    t0 = time.perf_counter()
    bank, train_states = build_bank(encoder, split.train, cfg.device)
    fusion = RetrievalFusion(fusion_cfg).to(dev)
    um_cfg = cfg.user_memory()
    table = None if um_cfg is None else build_table(encoder, split, um_cfg, cfg.device)
    model = RetrievalModel(encoder, fusion, bank, cfg, table)
    train_q = Queries(train_states, model.retrieve(train_states, split.train), model.user_items(split.train))
    valid_q = model.queries(split.valid)
    log.info("memory bank: %d memories, states and retrieval in %.1fs", len(bank), time.perf_counter() - t0)

    opt = torch.optim.Adam(fusion.parameters(), lr=cfg.lr)
    result = FinetuneResult(0, {})
    best_state = {k: v.detach().clone() for k, v in fusion.state_dict().items()}
    bad = 0
    for epoch in range(1, cfg.epochs + 1):
        if bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        loss = _epoch(model, train_q, split.train.targets, opt, cfg, rng, dev, f"fine-tune {epoch}")
        seconds = time.perf_counter() - t0
        valid = evaluate_retrieval(model, valid_q, split.valid, split.valid_seen, cfg.device)
        result.history.append(EpochLog(epoch, loss, seconds, valid))
        score = valid["unmasked"][cfg.valid_metric]
        if not result.best_valid or score > result.best_valid["unmasked"][cfg.valid_metric]:
            result.best_epoch, result.best_valid, bad = epoch, valid, 0
            best_state = {k: v.detach().clone() for k, v in fusion.state_dict().items()}
        else:
            bad += 1
        log.info(
            "fine-tune epoch %d loss %.4f %.1fs valid %s %.4f", epoch, loss, seconds, cfg.valid_metric, score
        )
    fusion.load_state_dict(best_state)
    fusion.eval()
    if cfg.tune_vote:
        result.vote_grid = vote_grid or VoteGrid()
        result.vote = tune_vote(model, valid_q, split.valid, result.vote_grid, vote_min_z)
    if cfg.tune_transitions:
        vote = cfg.vote()
        if cfg.tune_vote and vote.on:  # the chosen vote's voters, over the same states
            valid_q = replace(valid_q, voters=model.nearest(valid_q.states, split.valid, vote.depth))
        result.transitions = tune_transitions(model, valid_q, split.valid, vote_min_z)
    return model, result


def tune_transitions(
    model: RetrievalModel, queries: Queries, samples: Samples, min_z: float = 2.0
) -> tr.TuneResult:
    """Choose λ of the transition channel on ``samples`` (validation; the bank holds the training pairs)
    over the model's scores with its vote, and set it in ``model.cfg``."""
    t0 = time.perf_counter()
    model.fusion.eval()
    dev = torch.device(model.cfg.device)
    recent = queries.recent
    assert recent is not None
    order = model.cfg.transition_order

    def batches() -> Iterator[tr.Batch]:
        for s in range(0, len(samples), model.cfg.batch_size):
            idx = np.arange(s, min(s + model.cfg.batch_size, len(samples)))
            states, retrieved, user_items = queries.subset(idx)
            scores = model.scores(
                torch.from_numpy(states).to(dev), retrieved, user_items, queries.voter_subset(idx)
            )
            shares = tr.shares_from_matrix(recent[idx], model.follow, order).to(dev)
            yield scores, shares, torch.from_numpy(samples.targets[idx]).to(dev)

    with torch.inference_mode():
        result = tr.tune(batches(), order, min_z=min_z)
    model.cfg.transition_weight = result.best.weight
    off, chosen = result.table[0], next(r for r in result.table if r["weight"] == result.best.weight)
    cand = result.candidate
    if cand is None:
        verdict = "none beat off"
    elif not result.best.on:
        verdict = f"refused λ {cand.weight:g}: gain {result.z:.1f} standard errors, needs {min_z:.1f}"
    else:
        verdict = f"kept λ {result.best.weight:g}: gain {result.z:.1f} standard errors, needs {min_z:.1f}"
        if cand != result.best:
            verdict += f"; λ {cand.weight:g} won validation without a significant gain"
    log.info(
        "transition channel: λ %g; valid ndcg@10 %.4f hr@10 %.4f (off: %.4f, %.4f; %s) in %.0fs",
        result.best.weight,
        chosen["ndcg@10"],
        chosen["hr@10"],
        off["ndcg@10"],
        off["hr@10"],
        verdict,
        time.perf_counter() - t0,
    )
    return result


def tune_vote(
    model: RetrievalModel, queries: Queries, samples: Samples, grid: VoteGrid, min_z: float = 2.0
) -> TuneResult:
    """Choose the memory vote on ``samples`` (validation) and set it in ``model.cfg``; returns every
    candidate's metrics and the winner's z. The fused logits are computed once per batch and shared by
    the candidates."""
    t0 = time.perf_counter()
    model.fusion.eval()
    dev = torch.device(model.cfg.device)
    voters = model.nearest(queries.states, samples, grid.max_depth)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        for s in range(0, len(samples), model.cfg.batch_size):
            idx = np.arange(s, min(s + model.cfg.batch_size, len(samples)))
            states, retrieved, user_items = queries.subset(idx)
            logits = model.logits(torch.from_numpy(states).to(dev), retrieved, user_items)
            items, sims = model.voter_tensors(Retrieved(voters.ids[idx], voters.scores[idx]), dev)
            yield logits, items, sims, torch.from_numpy(samples.targets[idx]).to(dev)

    with torch.inference_mode():
        result = tune(batches(), grid, min_z=min_z)
    best = result.best
    model.cfg.vote_weight, model.cfg.vote_temperature, model.cfg.vote_depth = (
        best.weight,
        best.temperature,
        best.depth,
    )
    off = result.table[0]
    chosen = result.table[grid.votes().index(best)]
    cand = result.candidate
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
        time.perf_counter() - t0,
    )
    return result


def _epoch(
    model: RetrievalModel,
    queries: Queries,
    targets: IntArray,
    opt: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    rng: np.random.Generator,
    dev: torch.device,
    desc: str,
) -> float:
    model.fusion.train()
    perm = rng.permutation(len(targets))
    total, n = 0.0, 0
    for s in tqdm(range(0, len(perm), cfg.batch_size), desc=desc, leave=False, mininterval=2.0):
        idx = perm[s : s + cfg.batch_size]
        states, retrieved, user_items = queries.subset(idx)
        fused = model.fused(torch.from_numpy(states).to(dev), retrieved, user_items)  # (B, D); no vote here
        loss = model.encoder.next_item_loss(fused, torch.from_numpy(targets[idx]).to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach())
        n += 1
    return total / max(n, 1) if n else math.nan


def evaluate_on_test(
    model: RetrievalModel, split: Split, cfg: FinetuneConfig
) -> tuple[RetrievalModel, Queries, Metrics]:
    """Add the validation pairs to the bank (never test targets) and evaluate on the test samples;
    returns the test-time model, its test queries and their metrics."""
    valid_bank, _ = build_bank(model.encoder, split.valid, cfg.device)
    full = RetrievalModel(model.encoder, model.fusion, model.bank.concat(valid_bank), cfg, model.user_table)
    test_q = full.queries(split.test)
    head = head_items(split.train.targets, model.encoder.cfg.n_items)
    return full, test_q, evaluate_retrieval(full, test_q, split.test, split.test_seen, cfg.device, head)


def retrieval_cost(model: RetrievalModel, split: Split, n_queries: int = 2_000) -> dict[str, float]:
    """What retrieval costs, measured on the model as trained: building the test-time bank (encode
    every training and validation prefix, index the keys), its size, and per 1,000 test queries the
    encoder pass, the search (leakage rule and adaptive depth included) and the fusion; the ranking
    over the whole catalogue, which every model pays, is left out."""
    device = model.cfg.device
    t0 = time.perf_counter()
    train_bank, _ = build_bank(model.encoder, split.train, device)
    bank = train_bank.concat(build_bank(model.encoder, split.valid, device)[0])
    build_s = time.perf_counter() - t0
    arrays = (bank.keys, bank.unit_keys, bank.items, bank.users, bank.prefix_lens)
    full = RetrievalModel(model.encoder, model.fusion, bank, model.cfg, model.user_table)
    samples = split.test.subset(np.arange(min(n_queries, len(split.test))))
    t0 = time.perf_counter()
    states = encode_samples(model.encoder, samples, device)
    t1 = time.perf_counter()
    retrieved = full.retrieve(states, samples)
    vote = model.cfg.vote()
    if vote.on:  # the voters' own search; their mix belongs to the ranking, left out as said above
        full.nearest(states, samples, vote.depth)
    t2 = time.perf_counter()
    model.fusion.eval()
    dev = torch.device(device)
    with torch.inference_mode():
        for s in range(0, len(states), 256):
            rows = np.arange(s, min(s + 256, len(states)))
            q = Queries(states, retrieved, full.user_items(samples)).subset(rows)
            h = torch.from_numpy(q[0]).to(dev)
            model.fusion(h, *full.memory_tensors(h, q[1], q[2]))
    t3 = time.perf_counter()
    per_1k = 1000.0 / len(states)
    return {
        "bank_memories": float(len(bank)),
        "bank_build_seconds": build_s,
        "bank_mb": sum(a.nbytes for a in arrays) / 2**20,
        "encode_ms_per_1k": (t1 - t0) * 1000 * per_1k,
        "retrieve_ms_per_1k": (t2 - t1) * 1000 * per_1k,
        "fuse_ms_per_1k": (t3 - t2) * 1000 * per_1k,
    }
