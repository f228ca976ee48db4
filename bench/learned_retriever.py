"""Learned retriever benchmark (our AutoMR adaptation, ``model/retriever.py``) → reports/learned_retriever.*

    python -m bench.learned_retriever --datasets ml-100k lastfm yelp --seeds 0 1 2

For each dataset and seed: the frozen encoder of the accuracy benchmark (trained here if its model
directory is missing), the long-term memory of every user (layer-1 states of prefixes older than the
50-item window), δ labels on the candidates, the retriever, and test metrics of four rules on the test
queries that have long-term memory: none (the encoder alone), similarity, random, learned. One result
file per (dataset, seed) in ``reports/learned_retriever_runs/``; the report aggregates what exists.
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

from bench.common import REPORTS, RUNS, grouped_results, machine, machine_label, stat, train_cli
from model import artifact
from model.data import leave_one_out, load_dataset
from model.retriever import RULES, RetrieverConfig, compare_rules

log = logging.getLogger("bench.learned_retriever")

RESULTS = REPORTS / "learned_retriever_runs"
DATASETS = ["ml-100k", "lastfm", "yelp"]  # the long-history datasets AutoMR evaluates on
ENCODER = ("sasrec", "allpos")  # long-history datasets: SASRec's all-position scheme (reports/accuracy.md)


def encoder_dir(dataset: str, seed: int, args: argparse.Namespace) -> Path | None:
    out = RUNS / "accuracy" / dataset / f"{ENCODER[0]}_{ENCODER[1]}-seed{seed}"
    if not (out / "config.json").is_file():
        cli = ["--dataset", dataset, "--stage", "pretrain", "--objective", ENCODER[0], "--scheme", ENCODER[1]]
        cli += ["--seed", str(seed), "--out", str(out), "--resume"]
        metrics, _ = train_cli(cli, device=args.device, threads=args.threads, data_dir=args.data_dir)
        if metrics is None:
            return None
    return out


def run_one(dataset: str, seed: int, args: argparse.Namespace, command: str) -> None:
    path = RESULTS / f"{dataset}.seed{seed}.json"
    if path.is_file():
        log.info("%s exists, skipping", path.name)
        return
    model_dir = encoder_dir(dataset, seed, args)
    if model_dir is None:
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    art = artifact.load(model_dir, args.device or "cpu")
    split = leave_one_out(load_dataset(dataset, args.data_dir).with_vocab(art.vocab), art.encoder.cfg.max_len)
    cfg = RetrieverConfig(k=args.k, candidates=args.candidates, seed=seed, device=args.device or "cpu")
    t0 = time.perf_counter()
    result = compare_rules(art.encoder, split, cfg)
    record = {
        "dataset": dataset,
        "seed": seed,
        "encoder": model_dir.name,
        "model_version": art.model_version,
        "k": cfg.k,
        "candidates": cfg.candidates,
        "seconds": time.perf_counter() - t0,
        **result,
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def aggregate() -> dict[str, Any]:
    groups = grouped_results(RESULTS, lambda r: str(r["dataset"]))
    report: dict[str, Any] = {}
    for dataset, rs in groups.items():
        report[dataset] = {
            "seeds": [r["seed"] for r in rs],
            "queries": rs[0]["queries"],
            "labels": {k: stat([r["labels"][k] for r in rs]) for k in rs[0]["labels"]},
            "test": {
                rule: {
                    p: {m: stat([r["test"][rule][p][m] for r in rs]) for m in ("hr@10", "ndcg@10", "ndcg@20")}
                    for p in ("unmasked", "masked")
                }
                for rule in RULES
            },
            "seconds": float(np.median([r["seconds"] for r in rs])),
            "machines": sorted({machine_label(r["machine"]) for r in rs}),
            "commands": sorted({r["command"] for r in rs}),
        }
    return report


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if len(s["seeds"]) > 1 else f"{s['mean']:.4f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Learned retriever over long-term memory (AutoMR adaptation)",
        "",
        f"Generated {datetime.now(UTC).date().isoformat()} from `reports/learned_retriever_runs/`. Frozen",
        "SASRec-CE encoder (all-position scheme); long-term memory = layer-1 states of the user's prefixes",
        "that end before the 50-item window; a memory is fused as an extra token before the window at",
        "layer 1; labels δ = CE without − CE with the memory on the 32 most similar candidates; the MLP",
        "retriever is trained with KL(softmax(δ) ‖ s). Test queries *with* long-term memory only (the",
        "others are the same under every rule). mean ± sample std over seeds.",
        "",
    ]
    for dataset, d in report.items():
        q = d["queries"]
        lines += [
            f"## {dataset} (seeds {d['seeds']}; {q['test']} of {q['test_all']} test users have long-term "
            f"memory; {q['train']} labelled training queries)",
            "",
            "| rule | HR@10 | NDCG@10 | NDCG@20 | HR@10 masked | NDCG@10 masked |",
            "|---|---|---|---|---|---|",
        ]
        for rule in RULES:
            t = d["test"][rule]
            cells = [_fmt(t["unmasked"][m]) for m in ("hr@10", "ndcg@10", "ndcg@20")]
            cells += [_fmt(t["masked"][m]) for m in ("hr@10", "ndcg@10")]
            lines.append(f"| {rule} | {' | '.join(cells)} |")
        lab = d["labels"]
        lines += [
            "",
            f"Labels: mean δ {_fmt(lab['mean_delta'])}, share of candidates with δ > 0 "
            f"{_fmt(lab['positive_share'])}, best candidate's δ {_fmt(lab['best_candidate_mean_delta'])} "
            f"(nats). Wall time per seed {d['seconds'] / 60:.1f} min on {', '.join(d['machines'])}.",
            f"Command: `{d['commands'][0]}`.",
            "",
        ]
    missing = [d for d in DATASETS if d not in report]
    if missing:
        lines += [f"No results yet for {', '.join(missing)}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.report_only:
        for dataset in args.datasets:
            for seed in args.seeds:
                command = "python -m bench.learned_retriever " + shlex.join(
                    ["--datasets", dataset, "--seeds", str(seed), "--k", str(args.k)]
                )
                run_one(dataset, seed, args, command)
    report = aggregate()
    (REPORTS / "learned_retriever.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / "learned_retriever.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
