"""Benchmark controls: `memrec train` with the memories retrieved otherwise than by similarity.

    python -m bench.controls train --dataset beauty --stage finetune --from DIR --out DIR [flags]

The flags are `memrec train`'s own (service.cli.build_parser) and so is the JSON printed. The one
control, ``random``, draws each query's memories uniformly at random from the bank (the leakage rule
applied): fine-tuned and tested so, it shows whether similarity matters (`bench.retrieval`'s
``random_retrieval`` variant). Its model directory is a control, never a product: its training config
says ``"retrieval": "random"``, and the service refuses to serve it
(service.recommender.serving_predictor).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model import artifact, offline
from model.memory import BankHits, MemoryBank, l2_normalise
from model.predictor import Plan, Predictor, select, take
from service.cli import build_parser, cmd_train, run_job

log = logging.getLogger("bench.controls")

RANDOM = "random"  # the training config's "retrieval" of a model trained with RandomMemories


def random_memories(
    predictor: Predictor, bank: MemoryBank, plan: Plan, width: int, rng: np.random.Generator
) -> BankHits:
    """``width`` memories per query drawn uniformly at random from ``bank``, in draw order: 2 · width
    draws, the first ``width`` that survive the predictor's selection rules (the leakage rule; other
    users' memories only with the cross-user rule), -1 and -inf where fewer survive. Scores are the
    drawn memories' true cosine similarities to the query."""
    draw = rng.integers(0, len(bank), size=(len(plan.states), 2 * width))  # spare draws for the dropped
    drawn = bank.hits(draw, np.zeros(draw.shape, np.float32))
    cols, kept = select(drawn, width, plan.users, plan.prefix_lens, predictor.cfg.cross_user)
    ids = np.where(kept, take(draw, cols), -1).astype(np.int64)
    unit = l2_normalise(np.asarray(plan.states, dtype=np.float32))
    keys = bank.unit_keys[np.maximum(ids, 0)]  # (B, width, D)
    scores = np.where(ids >= 0, np.einsum("bd,bkd->bk", unit, keys), -np.inf).astype(np.float32)
    return bank.hits(ids, scores)


@dataclass(frozen=True)
class RandomMemories:
    """The random control as a retrieval (model.offline.Retrieve). Every call draws from a fresh
    generator seeded with ``seed``, so the training, validation and test queries each get the same
    stream (the draws `memrec train --retrieval random` made)."""

    seed: int

    def __call__(self, predictor: Predictor, bank: MemoryBank, plan: Plan, width: int) -> BankHits:
        return random_memories(predictor, bank, plan, width, np.random.default_rng(self.seed))


def retrieval_of(art: artifact.Artifact) -> offline.Retrieve:
    """How a model directory's memories were retrieved in training: its control, or similarity."""
    legacy = art.finetune_config.get("retrieval", "similarity")  # `memrec train --retrieval`, once
    kind = art.train_config.get("retrieval", legacy)
    if kind == RANDOM:
        return RandomMemories(int(art.finetune_config.get("seed", 0)))
    if kind != "similarity":
        raise artifact.ArtifactError(f"model {art.model_version}: unknown retrieval control {kind!r}")
    return offline.nearest


def mark_control(model_dir: Path, kind: str) -> None:
    """Record in the model directory's config that its memories were retrieved by the control ``kind``."""
    path = model_dir / artifact.CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config["train"] = {**config.get("train", {}), "retrieval": kind}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written config


def train_random(args: argparse.Namespace) -> dict[str, Any]:
    """`memrec train` with random memories; the model directory is marked as the control."""
    out = cmd_train(args, retrieve=RandomMemories(args.seed))
    mark_control(args.out, RANDOM)
    return out


def parser() -> argparse.ArgumentParser:
    p = build_parser()  # memrec's own flags
    p.prog = "python -m bench.controls"
    p.description = "memrec train with random memories (the control); the flags are memrec train's"
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command != "train":
        p.error("only `train` runs with a control")
    if args.stage == "pretrain":
        p.error("a retrieval control needs fine-tuning: --stage all or finetune")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_job(args, train_random)


if __name__ == "__main__":
    sys.exit(main())
