"""Learned retriever benchmark (our AutoMR adaptation, ``bench/retriever.py``) → reports/learned_retriever.*

    python -m bench.learned_retriever --datasets ml-100k lastfm yelp beauty sports --seeds 0 1 2

For each dataset and seed: a frozen encoder of the accuracy benchmark (trained through it first where
it has no result file): SASRec all-position on the long-history datasets AutoMR evaluates on, and on
Beauty and Sports the encoder of their retrieval ablation, so that the learned retriever's row in
``reports/retrieval.md`` sits on the same encoder per seed as every other variant there. Then the
long-term memory of every user (layer-1 states of prefixes older than the 50-item window), δ labels on
the candidates, the retriever, and test metrics of four rules (none = the encoder alone, similarity,
random, learned), both on the test queries that have long-term memory and on the whole test set. One
result file per (dataset, seed) in ``reports/learned_retriever_runs/``; the report aggregates what
exists.
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

from bench import accuracy
from bench.common import GROUPS, METRICS, PROTOCOLS, REPORTS, grouped_results, machine, machine_label, stat
from bench.retriever import RULES, RetrieverConfig, compare_rules
from model import artifact
from model.data import leave_one_out, load_dataset

log = logging.getLogger("bench.learned_retriever")

RESULTS = REPORTS / "learned_retriever_runs"
# the long-history datasets AutoMR evaluates on, then the short-history ones of the retrieval ablation
DATASETS = ["ml-100k", "lastfm", "yelp", "beauty", "sports"]
DEFAULT_ENCODER = "sasrec_allpos"  # SASRec's all-position scheme (reports/accuracy.md)


def encoder_variant(dataset: str) -> str:
    """The accuracy variant of the dataset's encoder: its retrieval ablation's, else the default."""
    return accuracy.ABLATION_ENCODER.get(dataset, DEFAULT_ENCODER)


def encoder_dir(dataset: str, seed: int, args: argparse.Namespace) -> Path | None:
    """The accuracy benchmark's encoder of this dataset and seed: trained there (result file in
    reports/accuracy_runs/, weights archived in reports/encoders/) when it does not exist yet."""
    run = argparse.Namespace(
        epochs=200, patience=10, device=args.device, threads=args.threads, data_dir=args.data_dir
    )
    variant = encoder_variant(dataset)
    if not accuracy.run_one(dataset, variant, seed, run):
        return None
    return accuracy.trained_encoder(dataset, variant, seed)


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
        "encoder_variant": encoder_variant(dataset),
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
            "encoder": str(rs[0].get("encoder_variant", DEFAULT_ENCODER)),
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
            "paired": paired(rs),
            **({"test_all": whole_test(rs)} if all("test_all" in r for r in rs) else {}),
            "seconds": float(np.median([r["seconds"] for r in rs])),
            "machines": sorted({machine_label(r["machine"]) for r in rs}),
            "commands": sorted({r["command"] for r in rs}),
        }
    return report


def paired(rs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """NDCG@10 of each retrieval rule minus that of ``none``, seed by seed: every rule of a seed runs
    on the same encoder and test queries, so the per-seed difference is the effect, free of the
    spread between encoders."""
    return {
        rule: {
            p: stat([r["test"][rule][p]["ndcg@10"] - r["test"]["none"][p]["ndcg@10"] for r in rs])
            for p in ("unmasked", "masked")
        }
        for rule in RULES
        if rule != "none"
    }


def whole_test(rs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every rule on the whole test set (queries without long-term memory score from the encoder
    alone), with the head/tail split: {rule: {protocol or group: {metric: stat}}}."""
    return {
        rule: {
            p: {m: stat([r["test_all"][rule][p][m] for r in rs]) for m in METRICS}
            for p in (*PROTOCOLS, *GROUPS)
        }
        for rule in RULES
    }


def ablation_entries() -> dict[tuple[str, str], dict[str, Any]]:
    """The learned retriever as a variant of the retrieval ablation: {(dataset, encoder variant):
    entry}, its figures on the whole test set, in the shape of ``bench.common.aggregate``'s entries
    (no training figures: the encoder is frozen and the retriever is not a `memrec train` stage)."""
    groups = grouped_results(RESULTS, lambda r: (str(r["dataset"]), str(r.get("encoder_variant", ""))))
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (dataset, variant), rs in sorted(groups.items()):
        rs = sorted((r for r in rs if "test_all" in r), key=lambda r: int(r["seed"]))
        if not rs:
            continue
        out[dataset, variant] = {
            "encoder": variant,
            "flags": [],
            "seeds": [r["seed"] for r in rs],
            "test": whole_test(rs)["learned"],
            "machines": sorted({machine_label(r["machine"]) for r in rs}),
            "commands": [r["command"] for r in rs],
            "dates": [r["date"] for r in rs],
        }
    return out


def _signed(s: dict[str, Any]) -> str:
    return f"{s['mean']:+.4f} ± {s['std']:.4f}" if len(s["seeds"]) > 1 else f"{s['mean']:+.4f}"


def _fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if len(s["seeds"]) > 1 else f"{s['mean']:.4f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Learned retriever over long-term memory (AutoMR adaptation)",
        "",
        f"Generated {datetime.now(UTC).date().isoformat()} from `reports/learned_retriever_runs/`. Frozen",
        "encoder per dataset (its accuracy variant in each heading); long-term memory = layer-1 states of",
        "the user's prefixes that end before the 50-item window; a memory is fused as an extra token",
        "before the window at layer 1; labels δ = CE without − CE with the memory on the 32 most similar",
        "candidates; the MLP retriever is trained with KL(softmax(δ) ‖ s). The tables hold the test",
        "queries *with* long-term memory only (the others are the same under every rule); the whole test",
        "set's NDCG@10 follows each table, and the learned rule's whole-test figures are the",
        "`learned_retriever` rows of `reports/retrieval.md`. mean ± sample std over seeds.",
        "",
    ]
    for dataset, d in report.items():
        q = d["queries"]
        lines += [
            f"## {dataset}, {d['encoder']} encoder (seeds {d['seeds']}; {q['test']} of {q['test_all']} test "
            f"users have long-term memory; {q['train']} labelled training queries)",
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
            "NDCG@10 minus that of `none`, paired per seed (unmasked / masked): "
            + "; ".join(
                f"{rule} {_signed(v['unmasked'])} / {_signed(v['masked'])}" for rule, v in d["paired"].items()
            )
            + ".",
            *_whole_test_line(d),
            "",
            f"Labels: mean δ {_fmt(lab['mean_delta'])}, share of candidates with δ > 0 "
            f"{_fmt(lab['positive_share'])}, best candidate's δ {_fmt(lab['best_candidate_mean_delta'])} "
            f"(nats). Wall time per seed (memory, labels, retriever and test; the encoder's training "
            f"not included) {d['seconds'] / 60:.1f} min on {', '.join(d['machines'])}.",
            f"Command: `{d['commands'][0]}`.",
            "",
        ]
    missing = [d for d in DATASETS if d not in report]
    if missing:
        lines += [f"No results yet for {', '.join(missing)}.", ""]
    return "\n".join(lines)


def _whole_test_line(d: dict[str, Any]) -> list[str]:
    if "test_all" not in d:
        return []
    whole = d["test_all"]
    cells = [
        f"{rule} {_fmt(whole[rule]['unmasked']['ndcg@10'])} / {_fmt(whole[rule]['masked']['ndcg@10'])}"
        for rule in RULES
    ]
    return ["", f"Whole test set, NDCG@10 (unmasked / masked): {'; '.join(cells)}."]


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
