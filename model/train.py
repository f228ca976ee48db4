"""Training the encoder: plain SASRec (full-softmax CE) and DuoRec-style collaborative pre-training.

Objectives (METHODS §1, §2 stage 1):

* ``sasrec``:   L = CE(h Eᵀ, y) over the whole catalogue.
* ``pretrain``: L = CE(h Eᵀ, y) + λ · InfoNCE(h', h⁺), where h' is a second forward pass of the same
  batch (another dropout mask) and h⁺ encodes a random other training sample with the same target.
  InfoNCE is NT-Xent over the 2N stacked vectors with dot-product similarity (DuoRec, Qiu et al. 2022).

Adam, early stopping on a validation metric with patience, the best state kept. A run with a
``checkpoint_dir`` writes its state after every epoch and resumes from it, so a long run survives
being stopped. Same seed and same initial weights, same numbers on the CPU (`memrec train` draws the
initial weights from the seed as well, so one command gives one model).

Under torchrun (model.distributed) each process trains on its shard of every epoch's samples with
DistributedDataParallel; rank 0 alone validates, decides when to stop (broadcast to the others) and
writes the checkpoint, and its best weights end up in every process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model import distributed
from model.data import (
    IntArray,
    SameTargetIndex,
    Samples,
    Split,
    all_position_targets,
    bucket_batches,
    window_samples,
)
from model.distributed import SINGLE, Dist
from model.evaluate import Metrics, evaluate
from model.sasrec import SASRec

log = logging.getLogger(__name__)

OBJECTIVES = ("sasrec", "pretrain")
# prefix: one sample per training prefix, loss at its last position (DuoRec/RecBole).
# allpos: one window per ≤ L targets, loss at every position (the original SASRec); far fewer encoder
# passes on long histories.
SCHEMES = ("prefix", "allpos")


@dataclass
class TrainConfig:
    objective: str = "pretrain"
    scheme: str = "prefix"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without validation improvement before stopping
    cl_weight: float = 0.1  # λ of the InfoNCE term
    temperature: float = 1.0
    valid_metric: str = "ndcg@10"  # of the unmasked (paper) protocol
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    seconds: float  # the training pass
    valid: Metrics
    valid_seconds: float = 0.0  # the validation pass (0 in checkpoints written before it was kept)


@dataclass
class TrainResult:
    best_epoch: int
    best_valid: Metrics
    history: list[EpochLog] = field(default_factory=list)

    @property
    def sec_per_epoch(self) -> float:
        return float(np.median([e.seconds for e in self.history])) if self.history else math.nan

    @property
    def train_seconds(self) -> float:
        """Wall time of every epoch run, training and validation, across resumed sessions."""
        return float(sum(e.seconds + e.valid_seconds for e in self.history))


# ----------------------------------------------------------------------------------------------------
# Losses


def info_nce(a: Tensor, b: Tensor, temperature: float = 1.0) -> Tensor:
    """NT-Xent: a, b (N, D) are paired views. Each of the 2N rows has its pair as the positive and
    the other 2N-2 rows as negatives; dot-product similarity divided by the temperature."""
    n = a.shape[0]
    z = torch.cat([a, b])  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    sim.fill_diagonal_(-math.inf)  # a row is never its own negative
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
    return F.cross_entropy(sim, labels)


def _batch(samples: Samples, idx: IntArray, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs trimmed to the batch's longest sequence: (B, T), lengths (B,), targets (B,)."""
    t = int(samples.lengths[idx].max())
    return (
        torch.from_numpy(samples.inputs[idx, :t]).to(device),
        torch.from_numpy(samples.lengths[idx]).to(device),
        torch.from_numpy(samples.targets[idx]).to(device),
    )


def encode_by_length(
    model: SASRec, samples: Samples, idx: IntArray, device: torch.device, chunks: int = 4
) -> Tensor:
    """States of samples ``idx`` in that order, encoded in length-sorted chunks. The positives of a
    length-bucketed batch have random lengths; one padded batch would cost as if all were the longest."""
    order = np.argsort(samples.lengths[idx], kind="stable")
    parts = [model.encode(*_batch(samples, idx[part], device)[:2]) for part in np.array_split(order, chunks)]
    out = torch.empty(len(idx), model.cfg.dim, device=device, dtype=parts[0].dtype)
    out[torch.from_numpy(order).to(device)] = torch.cat(parts)
    return out


def batch_loss(
    model: SASRec,
    samples: Samples,
    idx: IntArray,
    cfg: TrainConfig,
    positives: SameTargetIndex | None,
    rng: np.random.Generator,
    device: torch.device,
) -> Tensor:
    x, lengths, y = _batch(samples, idx, device)
    if cfg.scheme == "allpos":
        states = model(x)  # (B, T, D)
        y_all = torch.from_numpy(
            all_position_targets(
                samples.inputs[idx, : x.shape[1]], samples.lengths[idx], samples.targets[idx]
            )
        ).to(device)  # (B, T), 0 at padding
        real = y_all != 0
        loss = model.next_item_loss(states[real], y_all[real])
    else:
        loss = model.next_item_loss(model.encode(x, lengths), y)
    if cfg.objective == "pretrain":
        assert positives is not None
        h_view = model.encode(x, lengths)  # same sequences, another dropout mask
        h_pos = encode_by_length(model, samples, positives.sample(idx, rng), device)  # same targets
        loss = loss + cfg.cl_weight * info_nce(h_view, h_pos, cfg.temperature)
    return loss


# ----------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue a run exactly where it stopped


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a run killed mid-write keeps the previous checkpoint


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _history_to_state(history: list[EpochLog]) -> list[dict[str, Any]]:
    return [asdict(e) for e in history]


def _history_from_state(rows: list[dict[str, Any]]) -> list[EpochLog]:
    return [EpochLog(**r) for r in rows]


# ----------------------------------------------------------------------------------------------------
# The loop


# One batch's loss from its sample indexes and the generator that draws its contrastive positives.
Step = Callable[[IntArray, np.random.Generator], Tensor]


def _epoch_batches(
    split: Split, train_idx: IntArray, cfg: TrainConfig, rng: np.random.Generator, epoch: int, dist: Dist
) -> tuple[list[IntArray], np.random.Generator]:
    """This process's length-bucketed batches of the epoch and the generator its batches draw from.
    One process: all of ``train_idx`` with the run's own generator. Several: the process's shard of
    the permutation every process draws alike, bucketed with its own generator (model.distributed)."""
    if not dist.on:
        return _bucketed(split, train_idx, cfg, rng), rng
    shared, own = distributed.epoch_rngs(cfg.seed, epoch, dist)
    mine = train_idx[distributed.shard(len(train_idx), shared, dist)]
    distributed.log_shard(f"epoch {epoch}", mine, len(train_idx), dist)
    return _bucketed(split, mine, cfg, own), own


def _bucketed(split: Split, idx: IntArray, cfg: TrainConfig, rng: np.random.Generator) -> list[IntArray]:
    return [idx[b] for b in bucket_batches(split.train.lengths[idx], cfg.batch_size, rng)]


def _train_epoch(
    model: SASRec,
    step: Step,
    batches: list[IntArray],
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    desc: str,
) -> float:
    """One pass over ``batches``; returns the mean batch loss."""
    model.train()
    total, n_batches = 0.0, 0
    for idx in tqdm(batches, desc=desc, leave=False, mininterval=2.0):
        loss = step(idx, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach())
        n_batches += 1
    return total / max(n_batches, 1)


def _step(
    model: SASRec, split: Split, cfg: TrainConfig, positives: SameTargetIndex | None, dist: Dist
) -> Step:
    """The batch loss; under torchrun wrapped in DDP, whose backward averages the gradients."""
    device = torch.device(cfg.device)

    def loss(idx: IntArray, rng: np.random.Generator) -> Tensor:
        return batch_loss(model, split.train, idx, cfg, positives, rng, device)

    if not dist.on:
        return loss
    wrapped = distributed.data_parallel(model, loss, cfg.device)

    def synced(idx: IntArray, rng: np.random.Generator) -> Tensor:
        out: Tensor = wrapped(idx, rng)
        return out

    return synced


@dataclass
class _RunState:
    """What a checkpoint holds beyond model and optimizer weights."""

    result: TrainResult
    best_state: dict[str, Tensor]
    next_epoch: int = 1
    bad_epochs: int = 0


def _resume(
    ckpt: Path | None,
    model: SASRec,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    run: _RunState,
    dist: Dist = SINGLE,
) -> _RunState:
    # Rank 0 reads the checkpoint and hands it to the others: they need not see its file system.
    state = _load_checkpoint(ckpt) if ckpt is not None and dist.main else None
    if (state := distributed.broadcast_object(state, dist)) is None:
        return run
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = state["numpy_rng"]
    log.info("resumed from %s after epoch %d", ckpt, state["epoch"])
    return _RunState(
        TrainResult(state["best_epoch"], state["best_valid"], _history_from_state(state["history"])),
        state["best_model"],
        state["epoch"] + 1,
        state["bad_epochs"],
    )


def _checkpoint(
    ckpt: Path, model: SASRec, opt: torch.optim.Optimizer, rng: np.random.Generator, run: _RunState
) -> None:
    _save_checkpoint(
        ckpt,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "best_model": run.best_state,
            "best_epoch": run.result.best_epoch,
            "best_valid": run.result.best_valid,
            "history": _history_to_state(run.result.history),
            "epoch": run.next_epoch - 1,
            "bad_epochs": run.bad_epochs,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": rng.bit_generator.state,
        },
    )


def train(
    model: SASRec,
    split: Split,
    cfg: TrainConfig,
    checkpoint_dir: Path | None = None,
    dist: Dist = SINGLE,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best-validation weights.

    With ``checkpoint_dir``, the state after every epoch is written there and a later call with the
    same directory continues from it, with the same numbers as an uninterrupted run. With ``dist`` (one
    of several torchrun processes) this process trains on its shard; only rank 0 validates and writes
    the checkpoint, and only its result holds the history and the validation metrics.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    positives = SameTargetIndex(split.train.targets) if cfg.objective == "pretrain" else None
    train_idx = (
        window_samples(split.train, model.cfg.max_len)
        if cfg.scheme == "allpos"
        else np.arange(len(split.train), dtype=np.int64)
    )
    ckpt = checkpoint_dir / "checkpoint.pt" if checkpoint_dir else None
    run = _resume(ckpt, model, opt, rng, _RunState(TrainResult(0, {}), _clone_state(model)), dist)
    step = _step(model, split, cfg, positives, dist)

    while run.next_epoch <= cfg.epochs and run.bad_epochs < cfg.patience:
        epoch = run.next_epoch
        t0 = time.perf_counter()
        batches, batch_rng = _epoch_batches(split, train_idx, cfg, rng, epoch, dist)
        loss = _train_epoch(model, step, batches, opt, batch_rng, f"epoch {epoch}")
        loss = distributed.mean(loss, dist)  # the epoch's loss over every shard
        seconds = time.perf_counter() - t0
        if dist.main:
            _validate(model, split, cfg, run, epoch, loss, seconds, time.perf_counter())
        run.next_epoch += 1
        if ckpt is not None and dist.main:
            _checkpoint(ckpt, model, opt, rng, run)
        # Rank 0 alone knows whether validation improved: the others wait for its count here and stop
        # at the same epoch (the loop's condition reads the same numbers everywhere).
        run.bad_epochs = distributed.broadcast_int(run.bad_epochs, dist)
    model.load_state_dict(run.best_state)
    distributed.broadcast_weights(model, dist)  # rank 0's best epoch, in every process's model
    return run.result


def _validate(
    model: SASRec,
    split: Split,
    cfg: TrainConfig,
    run: _RunState,
    epoch: int,
    loss: float,
    seconds: float,
    t_valid: float,
) -> None:
    """Validate after ``epoch`` (its training pass took ``seconds``, validation starts at ``t_valid``):
    record it, keep the weights if they are the best so far, count the epochs without improvement."""
    valid = evaluate_encoder(model, split.valid, split.valid_seen, cfg)
    run.result.history.append(EpochLog(epoch, loss, seconds, valid, time.perf_counter() - t_valid))
    score = valid["unmasked"][cfg.valid_metric]
    if not run.result.best_valid or score > run.result.best_valid["unmasked"][cfg.valid_metric]:
        run.result.best_epoch, run.result.best_valid, run.bad_epochs = epoch, valid, 0
        run.best_state = _clone_state(model)
    else:
        run.bad_epochs += 1
    log.info(
        "epoch %d loss %.4f %.1fs valid %s %.4f (best %.4f @ %d)",
        epoch,
        loss,
        seconds,
        cfg.valid_metric,
        score,
        run.result.best_valid["unmasked"][cfg.valid_metric],
        run.result.best_epoch,
    )


def _clone_state(model: SASRec) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate_encoder(
    model: SASRec,
    samples: Samples,
    seen: tuple[IntArray, IntArray],
    cfg: TrainConfig,
    head: np.ndarray | None = None,
) -> Metrics:
    """Full-ranking metrics of a plain encoder (no retrieval) on ``samples``."""
    model.eval()
    return evaluate(
        lambda x, lengths, _idx: model.scores(model.encode(x, lengths)),
        samples,
        seen,
        device=cfg.device,
        batch_size=cfg.eval_batch_size,
        head=head,
    )
