"""Accuracy benchmark: our SASRec-CE baseline and the collaborative pre-training, several seeds.

    python -m bench.accuracy --datasets ml-100k beauty --seeds 0 1 2

Each (dataset, variant, seed) trains the encoder through `memrec train --stage pretrain` in a child
process into its own model directory under `runs/accuracy/` (resumable: checkpoints after every epoch)
and leaves one result file in `reports/accuracy_runs/`. The report `reports/accuracy.{json,md}`
aggregates every result file present, so seeds accumulate across machines and sessions; a finished run
is never repeated.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPORTS, RUNS, aggregate, cost_table, display_path, metric_table, run_recorded

log = logging.getLogger("bench.accuracy")

RESULTS = REPORTS / "accuracy_runs"

# variant → (objective, scheme); per-prefix samples are the published protocol (DuoRec/RaSeRec).
VARIANTS: dict[str, tuple[str, str]] = {
    "sasrec": ("sasrec", "prefix"),
    "pretrain": ("pretrain", "prefix"),
    "sasrec_allpos": ("sasrec", "allpos"),
    "pretrain_allpos": ("pretrain", "allpos"),
    "pretrain_warm": ("pretrain", "prefix"),
}
# variant → the variant whose encoder (same dataset and seed) it starts from: the retrieval objective
# added to a trained SASRec-CE, a fraction of the epochs of pre-training from scratch.
WARM_START: dict[str, str] = {"pretrain_warm": "sasrec"}
# dataset → the encoder its retrieval ablation is built on (the product's reported figures); the
# retrieval report keys that encoder's section by the dataset's name alone
ABLATION_ENCODER: dict[str, str] = {
    "beauty": "pretrain",
    "sports": "pretrain_warm",
    "ml-100k": "sasrec_allpos",
}

# Published test figures (METHODS §6, paper protocol: seen items not masked).
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "beauty": {
        "SASRec (full-softmax CE)": {"hr@10": 0.0830, "ndcg@10": 0.0415},
        "DuoRec": {"hr@5": 0.0541, "hr@10": 0.0834, "ndcg@5": 0.0337, "ndcg@10": 0.0431},
        "RaSeRec": {"hr@5": 0.0569, "hr@10": 0.0860, "ndcg@5": 0.0369, "ndcg@10": 0.0463},
        "RAMRec (reported)": {"hr@5": 0.0566, "hr@10": 0.0876, "ndcg@5": 0.0376, "ndcg@10": 0.0480},
    },
    "sports": {
        "DuoRec": {"hr@5": 0.0315, "hr@10": 0.0479, "ndcg@5": 0.0196, "ndcg@10": 0.0248},
        "RaSeRec": {"hr@5": 0.0331, "hr@10": 0.0497, "ndcg@5": 0.0211, "ndcg@10": 0.0264},
        "RAMRec (reported)": {"hr@5": 0.0339, "hr@10": 0.0521, "ndcg@5": 0.0218, "ndcg@10": 0.0284},
    },
}

PROTOCOL_NOTE = [
    "Protocol: chronological leave-one-out, inputs = last 50 items, full ranking over all items, test",
    "metrics at the epoch with the best validation metric. *unmasked* = paper protocol (seen items",
    "compete); *masked* = service protocol (items seen before the target removed). Ties count against",
    "the target (pessimistic rank). mean ± sample std over seeds.",
]


ENCODERS = REPORTS / "encoders"
ENCODER_FILES = ("config.json", "vocab.json", "model.safetensors")
# Weights stay out of the repository beyond this size (Yelp's 20k-item encoder is 5.3 MiB): such an
# encoder lives only in its run directory, on the machine that trained it.
ARCHIVE_MAX_BYTES = 5 * 1024 * 1024


def encoder_dir(dataset: str, variant: str, seed: int) -> Path:
    """Where the trained encoder of one run is: its run directory while it trains (and on the machine
    that trained it), else the copy archived under ``reports/encoders/`` when the run finished. `runs/`
    does not travel between machines; the retrieval benchmark fine-tunes on the very encoder whose
    result file exists, whichever machine trained it."""
    run = RUNS / "accuracy" / dataset / f"{variant}-seed{seed}"
    archived = ENCODERS / f"{dataset}.{variant}.seed{seed}"
    if not (run / "config.json").is_file() and (archived / "config.json").is_file():
        return archived
    return run


def trained_encoder(dataset: str, variant: str, seed: int) -> Path | None:
    """``encoder_dir`` if an encoder is there, else None with an error that says how to get one."""
    path = encoder_dir(dataset, variant, seed)
    if (path / "config.json").is_file():
        return path
    log.error(
        "no encoder for %s %s seed %d on this machine (neither %s nor an archived copy: its weights are "
        "over %d MiB, or its result file predates archiving): delete its result file to retrain",
        dataset, variant, seed, display_path(path), ARCHIVE_MAX_BYTES // 2**20,
    )  # fmt: skip
    return None


def archive_encoder(dataset: str, variant: str, seed: int) -> None:
    """Copy a finished run's model directory (weights, vocabulary, config; no checkpoints) into
    ``reports/encoders/``, once, unless its weights are over ``ARCHIVE_MAX_BYTES``."""
    run = RUNS / "accuracy" / dataset / f"{variant}-seed{seed}"
    archived = ENCODERS / f"{dataset}.{variant}.seed{seed}"
    if (archived / "config.json").is_file() or not (run / "config.json").is_file():
        return
    if (run / "model.safetensors").stat().st_size > ARCHIVE_MAX_BYTES:
        log.warning("%s %s seed %d: weights too large to archive, kept in the run directory only",
                    dataset, variant, seed)  # fmt: skip
        return
    archived.mkdir(parents=True, exist_ok=True)
    for name in ENCODER_FILES:
        shutil.copyfile(run / name, archived / name)
    log.info("archived the encoder of %s %s seed %d in %s", dataset, variant, seed, archived.name)


PARKED = REPORTS / "checkpoints"


def _checkpoint_paths(dataset: str, variant: str, seed: int) -> tuple[Path, Path]:
    run = RUNS / "accuracy" / dataset / f"{variant}-seed{seed}" / "checkpoints" / "checkpoint.pt"
    return run, PARKED / f"{dataset}.{variant}.seed{seed}.pt"


def park(dataset: str, variant: str, seed: int) -> bool:
    """Copy an unfinished run's last checkpoint under ``reports/checkpoints/``, so that a machine that
    is given that folder resumes it instead of starting over (`runs/` is scratch space). The folder is
    not tracked by git (weights stay out of the repository): copy it over by hand. False if there is
    none or the run already finished."""
    run, parked = _checkpoint_paths(dataset, variant, seed)
    if not run.is_file() or (RESULTS / f"{dataset}.{variant}.seed{seed}.json").is_file():
        return False
    parked.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run, parked)
    log.info("parked %s %s seed %d in %s", dataset, variant, seed, parked.name)
    return True


def _unpark(dataset: str, variant: str, seed: int) -> None:
    """Resume from a parked checkpoint when this machine has none of its own."""
    run, parked = _checkpoint_paths(dataset, variant, seed)
    if parked.is_file() and not run.is_file():
        run.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(parked, run)
        log.info("resuming %s %s seed %d from %s", dataset, variant, seed, parked.name)


def run_one(dataset: str, variant: str, seed: int, args: argparse.Namespace) -> bool:
    """Train (or resume) one seed, write its result file and archive its encoder; False if training
    failed."""
    objective, scheme = VARIANTS[variant]
    out = RUNS / "accuracy" / dataset / f"{variant}-seed{seed}"
    cli_args = ["--dataset", dataset, "--stage", "pretrain", "--objective", objective, "--scheme", scheme]
    cli_args += ["--seed", str(seed), "--epochs", str(args.epochs), "--patience", str(args.patience)]
    cli_args += ["--out", str(out), "--resume"]
    record = {"dataset": dataset, "variant": variant, "objective": objective, "scheme": scheme, "seed": seed}
    if variant in WARM_START:
        base = encoder_dir(dataset, WARM_START[variant], seed)
        if not (base / "config.json").is_file():
            log.error(
                "%s %s seed %d starts from the %s encoder: train it first", dataset, variant, seed, base
            )
            return False
        cli_args += ["--init-from", str(base)]
        record["init_from"] = WARM_START[variant]
    _unpark(dataset, variant, seed)
    if not run_recorded(RESULTS / f"{dataset}.{variant}.seed{seed}.json", cli_args, args, record):
        return False
    archive_encoder(dataset, variant, seed)
    _checkpoint_paths(dataset, variant, seed)[1].unlink(missing_ok=True)  # finished: nothing to resume
    return True


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Accuracy: SASRec-CE and collaborative pre-training",
        "",
        f"Generated {datetime.now(UTC).date().isoformat()} by `python -m bench.accuracy` from the per-seed",
        "files in `reports/accuracy_runs/` (each holds its exact command, machine, seed and date).",
        "",
        *PROTOCOL_NOTE,
        "",
    ]
    for dataset, variants in report.items():
        rows = [
            (f"{name} ({v['scheme']})", len(v["seeds"]), p, v["test"][p])
            for name, v in variants.items()
            for p in ("unmasked", "masked")
        ]
        rows += [(f"published {n}", 0, "unmasked", pub) for n, pub in PUBLISHED.get(dataset, {}).items()]
        lines += [f"## {dataset}", "", *metric_table(rows), "", *cost_table(variants), ""]
    return "\n".join(lines)


def write_report() -> dict[str, Any]:
    report = aggregate(RESULTS)
    (REPORTS / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / "accuracy.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "beauty"])
    p.add_argument("--variants", nargs="+", default=["sasrec", "pretrain"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per training run")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--report-only", action="store_true", help="aggregate existing result files, train nothing"
    )
    p.add_argument(
        "--park",
        action="store_true",
        help="copy unfinished runs' checkpoints into reports/checkpoints/ (untracked); train nothing",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.park:
        for seed in args.seeds:
            for dataset in args.datasets:
                for variant in args.variants:
                    park(dataset, variant, seed)
        return 0
    failed = 0
    if not args.report_only:
        # Seed-major order: a stopped run still leaves one seed of everything rather than three of one.
        for seed in args.seeds:
            for dataset in args.datasets:
                for variant in args.variants:
                    failed += not run_one(dataset, variant, seed, args)
                    write_report()
    write_report()
    log.info("wrote %s and %s", REPORTS / "accuracy.json", REPORTS / "accuracy.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
