"""Which user memories to keep: the quality functions of the per-user banks, compared on real histories.

    python -m bench.user_memory --model runs/accuracy/ml-100k/sasrec_allpos-seed0 --capacities 10 25 50

Every user's sequence is replayed through the store's own merge and eviction code
(`model.user_memory.replay`: the clock counts interactions, each query accesses the 5 memories most
similar to its frozen encoder state) once per quality function and capacity C. What a memory is worth
is then measured without any trained fusion, on every sample (training, validation and test prefixes)
whose user already had more than C distinct items, where the policies can differ:

* ``coverage``: the best cosine similarity between the target's embedding and a memory, averaged;
* ``profile``: rank the unseen items by similarity to the mean of the memory's unit item embeddings;
  HR@10 / NDCG@10. A memory that kept the items that describe the user's coming choices ranks them
  higher.
* ``repeat_recall``: of the samples whose target the user had already interacted with, the share whose
  target is still in memory (what a repeat-aware consumer of the memory can use).

The fused models with user memories (both quality functions) are rows of `bench.retrieval`. Writes
``reports/user_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import display_path, write_report
from model import artifact
from model.data import IntArray, Samples, leave_one_out, load_dataset, seen_csr
from model.evaluate import evaluate
from model.memory import encode_samples
from model.user_memory import UserMemoryConfig, UserMemoryTable, replay, split_samples
from service.memory_rules import store_rules

log = logging.getLogger("bench.user_memory")


def seen_before(data_seqs: list[IntArray], samples: Samples) -> tuple[IntArray, IntArray]:
    """CSR over ``samples``: the items of each sample's prefix (the masked protocol's seen items)."""
    return seen_csr([data_seqs[u] for u in samples.users], samples.prefix_lens.tolist())


def memory_metrics(
    item_emb: torch.Tensor, table: UserMemoryTable, samples: Samples, seen: tuple[IntArray, IntArray]
) -> dict[str, float]:
    """What the memories held before each sample's target are worth for that target.

    coverage: mean over samples of the best cosine similarity between the target's embedding and a
    memory; profile HR@10 / NDCG@10: ranking every unseen item by similarity to the mean of the memory's
    unit embeddings."""
    unit = F.normalize(item_emb, dim=-1)  # (N + 1, D), row 0 = padding → 0
    user_items = torch.from_numpy(table.lookup(samples))  # (S, C)
    targets = torch.from_numpy(samples.targets)
    best = np.zeros(len(samples), dtype=np.float64)

    def score_fn(_x: torch.Tensor, _lengths: torch.Tensor, idx: IntArray) -> torch.Tensor:
        rows = torch.from_numpy(idx)
        mem = unit[user_items[rows]]  # (B, C, D); empty slots are 0
        sims = torch.einsum("bcd,bd->bc", mem, unit[targets[rows]])
        best[idx] = sims.masked_fill(user_items[rows] == 0, -1.0).max(dim=1).values.double().numpy()
        scores = mem.sum(dim=1) @ unit.T  # (B, N + 1)
        scores[:, 0] = -torch.inf
        return scores

    masked = evaluate(score_fn, samples, seen)["masked"]
    return {"coverage": float(best.mean()), "hr@10": masked["hr@10"], "ndcg@10": masked["ndcg@10"]}


def repeat_recall(table: UserMemoryTable, samples: Samples, seen_before: np.ndarray) -> float:
    """Share of repeat targets (``seen_before``) still held by the user's memory."""
    rows = np.flatnonzero(seen_before)
    if not len(rows):
        return float("nan")
    held = (table.lookup(samples.subset(rows)) == samples.targets[rows, None]).any(axis=1)
    return float(held.mean())


def prior_items(samples: Samples) -> tuple[np.ndarray, IntArray]:
    """One walk over every user's samples in order: (N,) bool, the target occurred earlier in the
    user's sequence, and (N,) the distinct items the user had interacted with before the target."""
    order = np.lexsort((samples.prefix_lens, samples.users))
    repeat = np.zeros(len(samples), dtype=bool)
    distinct = np.zeros(len(samples), dtype=np.int64)
    held: dict[int, set[int]] = {}
    for i in order:
        items = held.setdefault(int(samples.users[i]), set())
        if samples.prefix_lens[i] == 1:
            items.add(int(samples.inputs[i, 0]))
        repeat[i] = int(samples.targets[i]) in items
        distinct[i] = len(items)
        items.add(int(samples.targets[i]))
    return repeat, distinct


def run(args: argparse.Namespace) -> dict[str, Any]:
    art = artifact.load(Path(args.model))
    data = load_dataset(args.dataset or art.dataset, args.data_dir).with_vocab(art.vocab)
    split = leave_one_out(data, art.encoder.cfg.max_len)
    samples = split_samples(split)
    states = encode_samples(art.encoder, samples)
    item_emb = art.encoder.item_emb.weight.detach().float()
    is_repeat, distinct = prior_items(samples)
    lengths = np.bincount(samples.users) + 1  # sequence length per user (its samples + the first item)
    out: dict[str, Any] = {
        "model": display_path(Path(args.model).resolve()),
        "dataset": data.name,
        "users": int(len(split.test)),
        "samples": int(len(samples)),
        "median_history": float(np.median(lengths)),
        "repeat_share": float(is_repeat.mean()),
        "runs": [],
    }
    configs = [(c, "fewest_accesses", args.half_lives[0]) for c in args.capacities]
    configs += [(c, "recency_frequency", h) for c in args.capacities for h in args.half_lives]
    for capacity, quality, half_life in sorted(configs, key=lambda c: c[0]):
        cfg = UserMemoryConfig(capacity, quality, args.access_top, half_life)
        t0 = time.perf_counter()
        table = replay(item_emb.numpy(), samples, states, cfg, store_rules())
        seconds = time.perf_counter() - t0
        # Only samples whose user already had more than C distinct items: elsewhere nothing was evicted
        # and every policy holds the same memory.
        rows = np.flatnonzero(distinct > capacity)
        sub = samples.subset(rows)
        row = {
            "capacity": capacity,
            "quality": quality,
            "half_life": half_life if quality == "recency_frequency" else None,
            "samples": int(len(rows)),
            **memory_metrics(item_emb, table, sub, seen_before(data.sequences, sub)),
            "repeat_recall": repeat_recall(table, samples, is_repeat),
            "evictions": table.stats.evictions,
            "replay_seconds": seconds,
        }
        log.info("%s", row)
        out["runs"].append(row)
    return out


def fused_rows(model_dirs: list[str]) -> list[dict[str, Any]]:
    """Test metrics of fine-tuned model directories (with and without user memories) next to their
    encoder's, read from each directory's config.json."""
    rows = []
    for d in model_dirs:
        config = json.loads((Path(d) / "config.json").read_text())
        ft, metrics = config.get("finetune", {}), config["metrics"]
        inference = Path(d) / "inference.json"  # older directories: in the fine-tune config
        fused = bool((json.loads(inference.read_text()) if inference.is_file() else ft).get("user_memories"))
        rows.append(
            {
                "model": display_path(Path(d).resolve()),
                "user_memories": fused,
                "quality": ft.get("memory_quality") if fused else None,
                "capacity": ft.get("user_memory_slots", ft.get("user_capacity")) if fused else None,
                "test": {p: metrics["test"][p] for p in ("unmasked", "masked")},
                "encoder_test": {p: metrics["encoder"]["test"][p] for p in ("unmasked", "masked")},
                "best_epoch": metrics.get("best_epoch"),
                "sec_per_epoch": metrics.get("sec_per_epoch"),
            }
        )
    return rows


def fused_md(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "## Fused models (one seed)",
        "",
        "The same frozen encoder fine-tuned with the published module (K = 20) and with the user's own",
        "memories as extra fusion slots: `memrec train --stage finetune --from ENCODER --seed 0` with or",
        "without `--user-memories`; test metrics from each model directory.",
        "",
        "| model | user memories | NDCG@10 | HR@10 | masked NDCG@10 | encoder NDCG@10 | s/epoch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        um = f"C={r['capacity']}, {r['quality']}" if r["user_memories"] else "–"
        t, e = r["test"], r["encoder_test"]
        cells = [f"`{r['model']}`", um, f"{t['unmasked']['ndcg@10']:.4f}", f"{t['unmasked']['hr@10']:.4f}"]
        cells += [f"{t['masked']['ndcg@10']:.4f}", f"{e['unmasked']['ndcg@10']:.4f}"]
        cells.append(f"{r['sec_per_epoch']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# User memories: which quality function keeps the useful ones",
        "",
        f"Generated {result['date'][:10]} by `{result['command']}` on {result['machine']}.",
        "",
        f"Model `{result['model']}` on {result['dataset']}: {result['users']} users, {result['samples']} "
        f"samples, median history {result['median_history']:.0f} interactions, "
        f"{100 * result['repeat_share']:.1f} % of targets are repeats. Each user's sequence is replayed "
        "through the store's eviction code (clock = interactions; each query accesses the "
        f"{result['access_top']} memories most similar to its encoder state). Measured on the samples "
        "whose user already had more than C distinct items (elsewhere every policy holds the same "
        "memory): *coverage* = mean best cosine between the target's embedding and a memory; *profile* = "
        "HR@10 / NDCG@10 ranking the unseen items by the mean of the memory's unit embeddings; *repeat "
        "recall* = share of repeat targets still in memory (all samples).",
        "",
        "| C | quality | half-life | samples | coverage | profile HR@10 | profile NDCG@10 | repeat recall "
        "| evictions | replay s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        half = "–" if r["half_life"] is None else f"{r['half_life']:g}"
        cells = [str(r["capacity"]), r["quality"], half, str(r["samples"]), f"{r['coverage']:.4f}"]
        cells += [f"{r['hr@10']:.4f}", f"{r['ndcg@10']:.4f}", f"{r['repeat_recall']:.3f}"]
        cells += [str(r["evictions"]), f"{r['replay_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += fused_md(result.get("fused", []))
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory whose frozen encoder gives the states")
    p.add_argument("--dataset", default=None, help="default: the model's dataset")
    p.add_argument("--capacities", type=int, nargs="+", default=[10, 25, 50, 75])
    p.add_argument("--access-top", type=int, default=UserMemoryConfig.access_top)
    p.add_argument("--half-lives", type=float, nargs="+", default=[10.0, 50.0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="user_memory", help="report name under reports/")
    p.add_argument("--fused", nargs="*", default=[], help="fine-tuned model directories to list")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    result = run(args)
    result["access_top"] = args.access_top
    result["fused"] = fused_rows(args.fused)
    write_report(args.out, "bench.user_memory", argv, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
