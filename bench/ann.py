"""What approximate search costs the service in accuracy, and what it saves in time.

    python -m bench.ann --model artifacts/beauty --nprobes 8 16 32 64 128

The service searches its memory index with FAISS IVF once the bank holds ``exact_threshold`` memories
or more; ``nprobe`` lists are scanned per query. This benchmark loads a model directory's bank into the
service's own index (`memory_store.index.MemoryIndex`, the parameters the service uses) and into an exact
one, answers every test user of the model's dataset through the service's model path (the predictor:
encode → search → select → fuse, vote, transitions → rank with seen items masked; model.predictor), and
reports per nprobe: recall@K of the fused memories against
exact search, the share of top-10 lists identical to the exact ones, the mean top-10 overlap, test
HR@10 / NDCG@10 (masked protocol) and the search time per query (one thread, batches of 16, every query
a different user, so the index is read from memory as in serving). Writes ``reports/ann.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from bench.common import write_report
from memory_store import IndexParams, MemoryBatch, SearchResult
from memory_store.index import MemoryIndex
from memory_store.transitions import Followers
from model import artifact
from model import transitions as tr
from model.data import leave_one_out, load_dataset
from model.memory import l2_normalise
from model.predictor import Plan, Predictor, Ranked
from service.recommender import serving_predictor

log = logging.getLogger("bench.ann")

BATCH = 16  # queries per search call: a busy replica's micro-batch


class Searchable(Protocol):
    """What the answers read of an index: its search and its follower rows (a MemoryIndex, or an exact
    search over the same memories, bench.index_scale)."""

    def search(self, queries: np.ndarray, k: int, with_keys: bool = False) -> SearchResult: ...

    def followers(self, items: Sequence[int]) -> list[Followers]: ...


def build_index(art: artifact.Artifact, params: IndexParams) -> MemoryIndex:
    """The model's bank in the service's index, memory ids 1..N, with the prefix items the transition
    channel reads where the bank keeps them."""
    bank = art.bank
    assert bank is not None, "the model directory holds no memory bank (train with --stage all)"
    users = tuple(art.vocab.users[int(u)] for u in bank.users)
    width = tr.MAX_ORDER if bank.recent is not None else 0
    batch = MemoryBatch.create(
        bank.keys, bank.items, users, np.zeros(len(bank)), bank.prefix_lens, art.encoder.cfg.dim, bank.recent
    )
    index = MemoryIndex(art.encoder.cfg.dim, params, recent_width=width)
    index.add(np.arange(1, len(bank) + 1, dtype=np.int64), batch)
    return index


def answer(
    predictor: Predictor, index: Searchable, plan: Plan, masks: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-10 item ids (N, 10), fused memory ids (N, K; -1 past each row's depth) and search seconds per
    query, the way `service.pipeline` answers: the predictor's plan, the index's search and follower
    rows, the predictor's selection, fusion, vote, transitions and ranking."""
    tops, ids, search_s = [], [], 0.0
    unit = l2_normalise(plan.states)  # (N, D), as the store normalises its queries
    for s in range(0, plan.rows, BATCH):
        idx = np.arange(s, min(s + BATCH, plan.rows))
        batch = plan.subset(idx)
        t0 = time.perf_counter()
        hits = (
            index.search(np.ascontiguousarray(unit[idx]), batch.fetch, with_keys=True)
            if batch.fetch
            else None
        )
        search_s += time.perf_counter() - t0
        rows = followers(index, batch) if predictor.cfg.reads_transitions else None
        ranked = predictor.finish(batch, hits, rows, [masks[i] for i in idx], [10] * len(idx))
        tops.append(np.stack([np.pad(r.items, (0, 10 - len(r.items)), constant_values=-1) for r in ranked]))
        ids.append(fused_ids(hits, ranked, predictor.cfg.k))
    return np.concatenate(tops), np.concatenate(ids), search_s / plan.rows


def followers(index: Searchable, plan: Plan) -> dict[int, tr.Row]:
    """The follower rows the plan's transition channel reads, from the index (as the store answers)."""
    wanted = plan.wanted
    return {a: (f.items, f.lags, f.counts) for a, f in zip(wanted, index.followers(wanted), strict=True)}


def fused_ids(hits: SearchResult | None, ranked: list[Ranked], k: int) -> np.ndarray:
    """(B, k) the memory ids each answer fused, best first, -1 past its count."""
    out = np.full((len(ranked), k), -1, dtype=np.int64)
    for j, r in enumerate(ranked):
        if hits is not None and r.k_used:
            out[j, : r.k_used] = hits.ids[j, r.memory_cols]
    return out


def accuracy(tops: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    hit = tops == targets[:, None]  # (N, 10)
    rank = np.argmax(hit, axis=1)
    found = hit.any(axis=1)
    ndcg = np.where(found, 1.0 / np.log2(rank + 2), 0.0)
    return {"hr@10": float(found.mean()), "ndcg@10": float(ndcg.mean())}


def compare(tops: np.ndarray, ids: np.ndarray, ref_tops: np.ndarray, ref_ids: np.ndarray) -> dict[str, float]:
    recall = np.mean(
        [
            len(set(a[a >= 0]) & set(b[b >= 0])) / max((b >= 0).sum(), 1)
            for a, b in zip(ids, ref_ids, strict=True)
        ]
    )
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops, ref_tops, strict=True)])
    return {
        "memory_recall": float(recall),
        "top10_identical": float((tops == ref_tops).all(axis=1).mean()),
        "top10_overlap": float(overlap),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    art = artifact.load(args.model)
    predictor = serving_predictor(art)
    split = leave_one_out(load_dataset(art.dataset, args.data_dir))
    test = split.test
    rows = np.random.default_rng(args.seed).permutation(len(test))[: args.users]  # a random order of users
    histories = [test.inputs[i, : test.lengths[i]].tolist() for i in rows]
    indptr, seen = split.test_seen
    masks = [np.unique(seen[indptr[i] : indptr[i + 1]]) for i in rows]
    plan = predictor.prepare(histories, [art.vocab.users[int(test.users[i])] for i in rows])  # encoded once
    assert len(plan.warm) == plan.rows, "every test query has a history"
    params = IndexParams(threads=1)
    exact = build_index(art, replace(params, exact_threshold=len(art.bank or []) + 1))
    approx = build_index(art, params)
    ref_tops, ref_ids, exact_s = answer(predictor, exact, plan, masks)
    result: dict[str, Any] = {
        "model": Path(args.model).name,
        "model_version": art.model_version,
        "dataset": art.dataset,
        "memories": len(exact),
        "index_kind": approx.kind,
        "k": predictor.cfg.k,
        "users": len(rows),
        "exact": {**accuracy(ref_tops, test.targets[rows]), "search_ms_per_query": exact_s * 1e3},
        "nprobe": {},
    }
    for nprobe in args.nprobes:
        approx.set_nprobe(nprobe)
        tops, ids, search_s = answer(predictor, approx, plan, masks)
        result["nprobe"][str(nprobe)] = {
            **accuracy(tops, test.targets[rows]),
            **compare(tops, ids, ref_tops, ref_ids),
            "search_ms_per_query": search_s * 1e3,
        }
        log.info("nprobe %d: %s", nprobe, result["nprobe"][str(nprobe)])
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Approximate retrieval in the service",
        "",
        f"`{r['command']}` on {r['machine']}, {r['date']}.",
        "",
        f"Model `{r['model']}` (`{r['model_version']}`, {r['dataset']}), its bank of {r['memories']} "
        f"memories in the service's index ({r['index_kind']}), K = {r['k']}; {r['users']} test users "
        "answered through the service's model path with seen items masked. Recall and top-10 agreement "
        f"are against exact search; search time is per query, one thread, batches of {BATCH}.",
        "",
        "| search | memory recall@K | top-10 identical | top-10 overlap | HR@10 | NDCG@10 | ms/query |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    e = r["exact"]
    lines.append(f"| exact | 1.000 | 1.000 | 1.000 | {e['hr@10']:.4f} | {e['ndcg@10']:.4f} | "
                 f"{e['search_ms_per_query']:.3f} |")  # fmt: skip
    for nprobe, v in r["nprobe"].items():
        cells = [f"{v['memory_recall']:.3f}", f"{v['top10_identical']:.3f}", f"{v['top10_overlap']:.3f}"]
        cells += [f"{v['hr@10']:.4f}", f"{v['ndcg@10']:.4f}", f"{v['search_ms_per_query']:.3f}"]
        lines.append(f"| IVF, nprobe {nprobe} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/beauty")
    p.add_argument("--nprobes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--users", type=int, default=None, help="test users to answer (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    write_report("ann", "bench.ann", argv, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
