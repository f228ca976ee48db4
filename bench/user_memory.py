"""Which user memories to keep: the quality functions of the per-user banks, compared on real histories.

    python -m bench.user_memory --model runs/accuracy/ml-100k/pretrain_allpos-seed0 --capacities 10 25 50 75

Every user's sequence is replayed through the store's own merge and eviction code
(`model.user_memory.replay`: the clock counts interactions, each query accesses the 5 memories most
similar to its frozen encoder state) once per quality function and capacity C. What a memory is worth
is then measured without any trained fusion, on every sample of the split:

* ``profile``: rank the catalogue by similarity to the mean of the memory's unit item embeddings, seen
  items masked (the memory items are all seen); HR@10 / NDCG@10 over the test samples. A memory that
  kept the items that describe the user's coming choices ranks them higher.
* ``repeat_recall``: of the samples whose target the user had already interacted with, the share whose
  target is still in memory (what a repeat-aware consumer of the memory can use).

The fused models with user memories (both quality functions) are rows of `bench.retrieval`. Writes
``reports/user_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import REPORTS, display_path, machine, machine_label
from model import artifact
from model.data import IntArray, Samples, Split, leave_one_out, load_dataset
from model.evaluate import evaluate
from model.memory import encode_samples
from model.user_memory import QUALITIES, UserMemoryConfig, UserMemoryTable, replay, split_samples

log = logging.getLogger("bench.user_memory")


def profile_metrics(item_emb: torch.Tensor, table: UserMemoryTable, split: Split) -> dict[str, float]:
    """Test HR@10 / NDCG@10 (masked) of ranking by the mean unit embedding of the user's memory."""
    unit = F.normalize(item_emb, dim=-1)  # (N + 1, D), row 0 = padding → 0
    user_items = torch.from_numpy(table.lookup(split.test))  # (U, C)

    def score_fn(_x: torch.Tensor, _lengths: torch.Tensor, idx: IntArray) -> torch.Tensor:
        profile = unit[user_items[torch.from_numpy(idx)]].sum(dim=1)  # (B, D); empty slots add 0
        scores = profile @ unit.T  # (B, N + 1)
        scores[:, 0] = -torch.inf
        return scores

    masked = evaluate(score_fn, split.test, split.test_seen)["masked"]
    return {"hr@10": masked["hr@10"], "ndcg@10": masked["ndcg@10"]}


def repeat_recall(table: UserMemoryTable, samples: Samples, seen_before: np.ndarray) -> float:
    """Share of repeat targets (``seen_before``) still held by the user's memory."""
    rows = np.flatnonzero(seen_before)
    if not len(rows):
        return float("nan")
    held = (table.lookup(samples.subset(rows)) == samples.targets[rows, None]).any(axis=1)
    return float(held.mean())


def repeats(samples: Samples) -> np.ndarray:
    """(N,) bool: the target occurred earlier in the same user's sequence."""
    order = np.lexsort((samples.prefix_lens, samples.users))
    out = np.zeros(len(samples), dtype=bool)
    seen: dict[int, set[int]] = {}
    for i in order:
        held = seen.setdefault(int(samples.users[i]), set())
        if samples.prefix_lens[i] == 1:
            held.add(int(samples.inputs[i, 0]))
        out[i] = int(samples.targets[i]) in held
        held.add(int(samples.targets[i]))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    art = artifact.load(Path(args.model))
    data = load_dataset(args.dataset or art.dataset, args.data_dir).with_vocab(art.vocab)
    split = leave_one_out(data, art.encoder.cfg.max_len)
    samples = split_samples(split)
    states = encode_samples(art.encoder, samples)
    item_emb = art.encoder.item_emb.weight.detach().float()
    is_repeat = repeats(samples)
    lengths = np.bincount(samples.users) + 1  # sequence length per user (its samples + the first item)
    out: dict[str, Any] = {
        "model": display_path(Path(args.model)),
        "dataset": data.name,
        "users": int(len(split.test)),
        "median_history": float(np.median(lengths)),
        "repeat_share": float(is_repeat.mean()),
        "runs": [],
    }
    for capacity in args.capacities:
        for quality in QUALITIES:
            cfg = UserMemoryConfig(capacity, quality, args.access_top, args.half_life)
            t0 = time.perf_counter()
            table = replay(item_emb.numpy(), samples, states, cfg)
            seconds = time.perf_counter() - t0
            row = {
                "capacity": capacity,
                "quality": quality,
                "profile": profile_metrics(item_emb, table, split),
                "repeat_recall": repeat_recall(table, samples, is_repeat),
                "evictions": table.stats.evictions,
                "replay_seconds": seconds,
            }
            log.info("%s", row)
            out["runs"].append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# User memories: which quality function keeps the useful ones",
        "",
        f"Generated {result['date'][:10]} by `{result['command']}` on {result['machine']}.",
        "",
        f"Model `{result['model']}` on {result['dataset']}: {result['users']} users, median history "
        f"{result['median_history']:.0f} interactions, {100 * result['repeat_share']:.1f} % of targets are "
        "repeats. Each user's sequence is replayed through the store's eviction code (clock = "
        f"interactions, half-life {result['half_life']:g}; each query accesses the {result['access_top']} "
        "memories most similar to its encoder state). *profile*: test HR@10 / NDCG@10, seen items "
        "masked, ranking by the mean of the memory's unit item embeddings; *repeat recall*: share of "
        "repeat targets still in memory.",
        "",
        "| C | quality | profile HR@10 | profile NDCG@10 | repeat recall | evictions | replay s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        p = r["profile"]
        cells = [str(r["capacity"]), r["quality"], f"{p['hr@10']:.4f}", f"{p['ndcg@10']:.4f}"]
        cells += [f"{r['repeat_recall']:.3f}", str(r["evictions"]), f"{r['replay_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory whose frozen encoder gives the states")
    p.add_argument("--dataset", default=None, help="default: the model's dataset")
    p.add_argument("--capacities", type=int, nargs="+", default=[10, 25, 50, 75])
    p.add_argument("--access-top", type=int, default=UserMemoryConfig.access_top)
    p.add_argument("--half-life", type=float, default=UserMemoryConfig.half_life)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="user_memory", help="report name under reports/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    result = run(args)
    result["access_top"], result["half_life"] = args.access_top, args.half_life
    result["command"] = shlex.join(
        ["python", "-m", "bench.user_memory", *(argv if argv is not None else sys.argv[1:])]
    )
    result["machine"] = machine_label(machine())
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    (REPORTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPORTS / f"{args.out}.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
