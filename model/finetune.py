"""Stage 2 of RaSeRec: retrieval-augmented fine-tuning on top of the frozen encoder (METHODS §2).

The encoder is frozen (dropout off), so every sample's state h and its top-K retrieved memories are
computed once (model.offline); an epoch then only runs the fusion module and the output layer, through
the predictor's own memory selection and fusion (model.predictor). The memory bank holds the training
pairs while training and validating, and the training + validation pairs at test time (never a test
target). Early stopping on validation HR@10 (unmasked), the best fusion weights kept. With
``tune_vote`` the memory vote is then chosen on validation over the trained fusion, and with
``tune_transitions`` the transition channel over both, then the learned hybrid against that channel
(model.tuning, model.hybrid); the chosen values make the
final, frozen :class:`~model.predictor.InferenceConfig`.

Under torchrun (model.distributed) every process prepares the training queries and trains the fusion on
its shard of each epoch with DistributedDataParallel; rank 0 alone validates, decides when to stop
(broadcast to the others) and tunes, and its best weights end up in every process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from model import distributed, offline, tuning
from model import hybrid as hy
from model import transitions as tr
from model.data import IntArray, Samples, Split
from model.distributed import SINGLE, Dist
from model.evaluate import Metrics, head_items
from model.fusion import FusionConfig, RetrievalFusion
from model.inference import InferenceConfig
from model.memory import FloatArray, MemoryBank, encode_samples
from model.predictor import Predictor
from model.sasrec import SASRec
from model.train import EpochLog
from model.user_memory import MemoryRules, UserMemoryConfig, UserMemoryTable, build_table
from model.vote import TuneResult, Vote, VoteGrid

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """How the fusion module is trained and tuned (how it scores is the InferenceConfig)."""

    epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-3
    patience: int = 10
    valid_metric: str = "hr@10"  # of the unmasked protocol
    # RAMRec's per-user memories, replayed offline (model.user_memory) when the inference config
    # fuses them: slots per user, eviction order, entries a query accesses, half-life in interactions
    user_memory_slots: int = 75
    memory_quality: str = "recency_frequency"
    memory_access_top: int = 5
    memory_half_life: float = 10.0
    # choose the memory vote, then the transition channel, on validation after fine-tuning (model.tuning)
    tune_vote: bool = False
    tune_transitions: bool = False
    seed: int = 0
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FinetuneConfig:
        """A saved config; older model directories kept the inference fields here too (ignored) and
        called the user-memory slots ``user_capacity``."""
        known = {f: v for f, v in data.items() if f in cls.__dataclass_fields__}
        if "user_capacity" in data and "user_memory_slots" not in data:
            known["user_memory_slots"] = data["user_capacity"]
        return cls(**known)

    def user_memory(self) -> UserMemoryConfig:
        return UserMemoryConfig(
            self.user_memory_slots, self.memory_quality, self.memory_access_top, self.memory_half_life
        )


@dataclass
class FinetuneResult:
    best_epoch: int
    best_valid: Metrics
    history: list[EpochLog] = field(default_factory=list)
    vote_grid: VoteGrid | None = None  # the candidates the vote was chosen from
    vote: TuneResult | None = None  # their validation metrics, the winner and its z (None: not tuned)
    transitions: tr.TuneResult | None = None  # the same for the transition channel
    hybrid: hy.TuneResult | None = None  # the learned hybrid against the chosen channel


@dataclass
class Finetuned:
    """A fine-tuned model: the predictor with its chosen inference config, over the training pairs."""

    predictor: Predictor
    bank: MemoryBank  # the training pairs
    user_table: UserMemoryTable | None = None  # every sample's user-memory snapshot, when fused

    def user_items(self, samples: Samples) -> IntArray | None:
        return None if self.user_table is None else self.user_table.lookup(samples)


def build_bank(encoder: SASRec, samples: Samples, device: str) -> tuple[MemoryBank, FloatArray]:
    keys = encode_samples(encoder, samples, device)
    return MemoryBank.from_samples(keys, samples), keys


def untuned(cfg: InferenceConfig) -> InferenceConfig:
    """The config fine-tuning trains with: the vote and the transition channel off."""
    return replace(cfg, vote=Vote(), transitions=tr.TransitionMix(0.0, cfg.transitions.order), hybrid=None)


def finetune(
    encoder: SASRec,
    split: Split,
    fusion_cfg: FusionConfig,
    cfg: FinetuneConfig,
    inference: InferenceConfig,
    vote_grid: VoteGrid | None = None,
    vote_min_z: float = 2.0,
    rules: MemoryRules | None = None,
    retrieve: offline.Retrieve = offline.nearest,
    dist: Dist = SINGLE,
) -> tuple[Finetuned, FinetuneResult]:
    """Train a fusion module over the frozen ``encoder`` for ``inference`` (its k, selection rules and
    user memories); returns the model over the training-pair bank, its vote and channel chosen on
    validation when asked (each stays off unless it beats off there by ``vote_min_z`` standard errors).
    ``rules``: the store's per-user memory rules, needed when ``inference`` fuses user memories.
    ``dist``: this process's place under torchrun; only rank 0 validates and tunes, the others return
    the trained fusion untuned and an empty result."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = torch.device(cfg.device)
    encoder.to(dev).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)

    t0 = time.perf_counter()
    bank, train_states = build_bank(encoder, split.train, cfg.device)
    fusion = RetrievalFusion(fusion_cfg).to(dev)
    table = _user_table(encoder, split, cfg, inference, rules)
    model = Finetuned(Predictor(encoder, fusion, untuned(inference)), bank, table)
    predictor = model.predictor
    train_items = model.user_items(split.train)
    train_q = offline.prepare(
        predictor, bank, split.train, states=train_states, user_items=train_items, retrieve=retrieve
    )
    valid_q = None  # validation is rank 0's alone
    if dist.main:
        valid_items = model.user_items(split.valid)
        valid_q = offline.prepare(
            predictor, bank, split.valid, cfg.device, user_items=valid_items, retrieve=retrieve
        )
    log.info("memory bank: %d memories, states and retrieval in %.1fs", len(bank), time.perf_counter() - t0)

    result = _train(predictor, fusion, train_q, valid_q, split, cfg, rng, dist)
    if valid_q is None:
        return model, result
    chosen = predictor.cfg
    if cfg.tune_vote:
        result.vote_grid = vote_grid or VoteGrid()
        result.vote = tuning.tune_vote(predictor, bank, valid_q, split.valid, result.vote_grid, vote_min_z)
        chosen = replace(chosen, vote=result.vote.best)
    if cfg.tune_transitions:
        voting = Predictor(encoder, fusion, chosen)
        if chosen.vote.on:  # the chosen vote's voters, over the same states
            valid_q = replace(valid_q, voters=offline.nearest(voting, bank, valid_q.plan, chosen.vote.depth))
        rows = offline.bank_rows(bank, max(tr.ORDERS))  # every order tuning tries reads them
        result.transitions = tuning.tune_transitions(voting, valid_q, split.valid, rows, vote_min_z)
        chosen = replace(chosen, transitions=result.transitions.best)
        channel = result.transitions.best
        result.hybrid = tuning.tune_hybrid(voting, valid_q, split.valid, rows, channel, vote_min_z)
        chosen = replace(chosen, hybrid=result.hybrid.best)
    return replace(model, predictor=Predictor(encoder, fusion, chosen)), result


def _user_table(
    encoder: SASRec, split: Split, cfg: FinetuneConfig, inference: InferenceConfig, rules: MemoryRules | None
) -> UserMemoryTable | None:
    if not inference.user_memories:
        return None
    if rules is None:
        raise ValueError("fusing user memories needs the store's rules (model.user_memory.MemoryRules)")
    return build_table(encoder, split, cfg.user_memory(), rules, cfg.device)


def _train(
    predictor: Predictor,
    fusion: RetrievalFusion,
    train_q: offline.Queries,
    valid_q: offline.Queries | None,
    split: Split,
    cfg: FinetuneConfig,
    rng: np.random.Generator,
    dist: Dist = SINGLE,
) -> FinetuneResult:
    """Epochs of the fusion module until validation stops improving; the best weights are kept.
    ``valid_q`` is None on the processes that do not validate (ranks other than 0)."""
    opt = torch.optim.Adam(fusion.parameters(), lr=cfg.lr)
    result = FinetuneResult(0, {})
    best_state = {k: v.detach().clone() for k, v in fusion.state_dict().items()}
    bad = 0
    step = _step(predictor, fusion, train_q, split.train.targets, cfg, dist)
    for epoch in range(1, cfg.epochs + 1):
        if bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        order = _epoch_order(len(split.train.targets), rng, cfg, epoch, dist)
        loss = distributed.mean(_epoch(predictor, step, order, opt, cfg, f"fine-tune {epoch}"), dist)
        seconds = time.perf_counter() - t0
        if valid_q is not None:
            valid = offline.evaluate_predictor(
                predictor, valid_q, split.valid, split.valid_seen, None, cfg.device
            )
            if _record(result, EpochLog(epoch, loss, seconds, valid), cfg):
                bad, best_state = 0, {k: v.detach().clone() for k, v in fusion.state_dict().items()}
            else:
                bad += 1
        bad = distributed.broadcast_int(bad, dist)  # rank 0's count: every process stops together
    fusion.load_state_dict(best_state)
    distributed.broadcast_weights(fusion, dist)  # rank 0's best epoch, in every process
    fusion.eval()
    return result


def _record(result: FinetuneResult, row: EpochLog, cfg: FinetuneConfig) -> bool:
    """Add a validated epoch to ``result``; True when it is the best so far (it becomes best_epoch)."""
    result.history.append(row)
    score = row.valid["unmasked"][cfg.valid_metric]
    best = not result.best_valid or score > result.best_valid["unmasked"][cfg.valid_metric]
    if best:
        result.best_epoch, result.best_valid = row.epoch, row.valid
    log.info(
        "fine-tune epoch %d loss %.4f %.1fs valid %s %.4f",
        row.epoch,
        row.loss,
        row.seconds,
        cfg.valid_metric,
        score,
    )
    return best


def _epoch_order(n: int, rng: np.random.Generator, cfg: FinetuneConfig, epoch: int, dist: Dist) -> IntArray:
    """The training samples this process visits in ``epoch``, in order: a permutation of all of them
    with one process; under torchrun its shard of the permutation every process draws alike."""
    if not dist.on:
        return rng.permutation(n)
    shared, _ = distributed.epoch_rngs(cfg.seed, epoch, dist)
    mine = distributed.shard(n, shared, dist)
    distributed.log_shard(f"fine-tune epoch {epoch}", mine, n, dist)
    return mine


def _step(
    predictor: Predictor,
    fusion: RetrievalFusion,
    queries: offline.Queries,
    targets: IntArray,
    cfg: FinetuneConfig,
    dist: Dist,
) -> Callable[[IntArray], Tensor]:
    """The loss of a batch of training samples; under torchrun wrapped in DDP over the fusion's
    weights (the encoder is frozen), whose backward averages the gradients over the processes."""
    dev = torch.device(cfg.device)

    def loss(idx: IntArray) -> Tensor:
        q = queries.batch(idx)
        mem = predictor.memories(q.plan, q.hits) if q.hits is not None else None
        fused = predictor.fused(torch.from_numpy(q.plan.states).to(dev), mem, q.user_items)  # no vote here
        return predictor.encoder.next_item_loss(fused, torch.from_numpy(targets[idx]).to(dev))

    if not dist.on:
        return loss
    wrapped = distributed.data_parallel(fusion, loss, cfg.device)

    def synced(idx: IntArray) -> Tensor:
        out: Tensor = wrapped(idx)
        return out

    return synced


def _epoch(
    predictor: Predictor,
    step: Callable[[IntArray], Tensor],
    order: IntArray,
    opt: torch.optim.Optimizer,
    cfg: FinetuneConfig,
    desc: str,
) -> float:
    """One pass over the samples ``order`` in batches; returns the mean batch loss."""
    assert predictor.fusion is not None
    predictor.fusion.train()
    total, n = 0.0, 0
    for s in tqdm(range(0, len(order), cfg.batch_size), desc=desc, leave=False, mininterval=2.0):
        loss = step(order[s : s + cfg.batch_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach())
        n += 1
    return total / max(n, 1) if n else math.nan


@dataclass
class TestRun:
    """The fine-tuned model at test time: the bank with the validation pairs added, the test queries
    searched in it, the follower rows the channel counts there, and the test metrics."""

    predictor: Predictor
    bank: MemoryBank
    queries: offline.Queries
    rows: dict[int, tr.Row] | None
    metrics: Metrics

    def evaluate(self, cfg: InferenceConfig, split: Split, device: str) -> Metrics:
        """The same test queries scored with another inference config (e.g. the vote off)."""
        other = Predictor(self.predictor.encoder, self.predictor.fusion, cfg)
        return offline.evaluate_predictor(other, self.queries, split.test, split.test_seen, self.rows, device)


def evaluate_on_test(
    model: Finetuned, split: Split, device: str, retrieve: offline.Retrieve = offline.nearest
) -> TestRun:
    """Add the validation pairs to the bank (never test targets) and evaluate on the test samples."""
    predictor = model.predictor
    valid_bank, _ = build_bank(predictor.encoder, split.valid, device)
    full = model.bank.concat(valid_bank)
    test_items = model.user_items(split.test)
    queries = offline.prepare(predictor, full, split.test, device, user_items=test_items, retrieve=retrieve)
    rows = (
        offline.bank_rows(full, predictor.cfg.transition_order) if predictor.cfg.reads_transitions else None
    )
    head = head_items(split.train.targets, predictor.encoder.cfg.n_items)
    metrics = offline.evaluate_predictor(predictor, queries, split.test, split.test_seen, rows, device, head)
    return TestRun(predictor, full, queries, rows, metrics)
