"""Accuracy benchmark: our SASRec-CE baseline and the collaborative pre-training, several seeds.

    python -m bench.accuracy --datasets ml-100k beauty --seeds 0 1 2

Each (dataset, variant, seed) trains through ``memrec train`` in a child process into its own model
directory under ``runs/accuracy/`` (resumable: checkpoints after every epoch) and leaves one result
file in ``reports/accuracy_runs/``. The report ``reports/accuracy.{json,md}`` aggregates every result
file present, so seeds accumulate across machines and sessions; a finished run is never repeated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.accuracy")

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
RUNS_DIR = REPORTS / "accuracy_runs"
# Model directories and checkpoints (large, not committed); MEMREC_RUNS_DIR puts them elsewhere.
MODELS_DIR = Path(os.environ.get("MEMREC_RUNS_DIR", ROOT / "runs")) / "accuracy"
METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")

# variant → (objective, scheme); per-prefix samples are the published protocol (DuoRec/RaSeRec).
VARIANTS: dict[str, tuple[str, str]] = {
    "sasrec": ("sasrec", "prefix"),
    "pretrain": ("pretrain", "prefix"),
    "sasrec_allpos": ("sasrec", "allpos"),
    "pretrain_allpos": ("pretrain", "allpos"),
}

# Published test figures (METHODS §6, paper protocol: seen items not masked).
PUBLISHED = {
    "beauty": {
        "SASRec (full-softmax CE)": {"hr@10": 0.0830, "ndcg@10": 0.0415},
        "DuoRec": {"hr@5": 0.0541, "hr@10": 0.0834, "ndcg@5": 0.0337, "ndcg@10": 0.0431},
        "RaSeRec": {"hr@5": 0.0569, "hr@10": 0.0860, "ndcg@5": 0.0369, "ndcg@10": 0.0463},
    },
    "sports": {
        "DuoRec": {"hr@5": 0.0315, "hr@10": 0.0479, "ndcg@5": 0.0196, "ndcg@10": 0.0248},
        "RaSeRec": {"hr@5": 0.0331, "hr@10": 0.0497, "ndcg@5": 0.0211, "ndcg@10": 0.0264},
    },
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def run_one(dataset: str, variant: str, seed: int, args: argparse.Namespace) -> Path | None:
    """Train (or resume) one seed; write and return its result file, None if training failed."""
    result_file = RUNS_DIR / f"{dataset}.{variant}.seed{seed}.json"
    if result_file.is_file():
        log.info("%s exists, skipping", result_file.relative_to(ROOT))
        return result_file
    objective, scheme = VARIANTS[variant]
    out = MODELS_DIR / dataset / f"{variant}-seed{seed}"
    if out.is_relative_to(ROOT):
        out = out.relative_to(ROOT)
    cmd = [sys.executable, "-m", "model.cli", "train", "--dataset", dataset, "--objective", objective]
    cmd += ["--scheme", scheme, "--seed", str(seed), "--epochs", str(args.epochs)]
    cmd += ["--patience", str(args.patience), "--out", str(out), "--resume"]
    if args.device:
        cmd += ["--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # As a user types it, without machine paths: data from $MEMREC_DATA_DIR, models under runs/.
    recorded = shlex.join(["memrec", *cmd[3:]]).replace(str(MODELS_DIR), "runs/accuracy")
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    log.info("running %s", recorded)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        log.error("%s %s seed %d failed with exit code %d", dataset, variant, seed, proc.returncode)
        return None
    metrics = json.loads(proc.stdout)
    record = {
        "dataset": dataset,
        "variant": variant,
        "objective": objective,
        "scheme": scheme,
        "seed": seed,
        "command": recorded,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **{
            k: metrics[k]
            for k in ("model_version", "best_epoch", "epochs_run", "sec_per_epoch", "peak_rss_mb")
        },
        "train_seconds": metrics["train_seconds"],
        "valid": metrics["valid"],
        "test": metrics["test"],
    }
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(record, indent=2) + "\n")
    return result_file


def _stat(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "seeds": values,
    }


def aggregate() -> dict[str, Any]:
    """Every result file present → {dataset: {variant: {test: {protocol: {metric: stats}}, …}}}."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in sorted(RUNS_DIR.glob("*.json")):
        r = json.loads(f.read_text())
        runs.setdefault((r["dataset"], r["variant"]), []).append(r)
    report: dict[str, Any] = {}
    for (dataset, variant), rs in sorted(runs.items()):
        rs.sort(key=lambda r: r["seed"])
        entry: dict[str, Any] = {
            "objective": rs[0]["objective"],
            "scheme": rs[0]["scheme"],
            "seeds": [r["seed"] for r in rs],
            "test": {
                p: {m: _stat([r["test"][p][m] for r in rs]) for m in METRICS} for p in ("unmasked", "masked")
            },
            "valid": {
                "unmasked": {m: _stat([r["valid"]["unmasked"][m] for r in rs]) for m in ("ndcg@10", "hr@10")}
            },
            "best_epoch": [r["best_epoch"] for r in rs],
            "sec_per_epoch": float(np.median([r["sec_per_epoch"] for r in rs])),
            "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs)),
            "machines": sorted({_machine_label(r["machine"]) for r in rs}),
            "commands": [r["command"] for r in rs],
            "dates": [r["date"] for r in rs],
        }
        report.setdefault(dataset, {})[variant] = entry
    return report


def _machine_label(m: dict[str, Any]) -> str:
    return f"{m['cpu']} ({m['cores']} cores)" + (f" + {m['gpu']}" if "gpu" in m else "")


def _fmt(stat: dict[str, Any]) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if len(stat["seeds"]) > 1 else f"{stat['mean']:.4f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Accuracy: SASRec-CE and collaborative pre-training",
        "",
        f"Generated {datetime.now(UTC).date().isoformat()} by `python -m bench.accuracy` from the per-seed",
        "files in `reports/accuracy_runs/` (each holds its exact command, machine, seed and date).",
        "",
        "Protocol: chronological leave-one-out, inputs = last 50 items, full ranking over all items, test",
        "metrics at the epoch with the best validation NDCG@10 (unmasked), patience 10. *unmasked* = paper",
        "protocol (seen items compete); *masked* = service protocol (items seen before the target removed).",
        "Ties count against the target (pessimistic rank). mean ± sample std over seeds.",
        "",
    ]
    for dataset, variants in report.items():
        lines += [
            f"## {dataset}",
            "",
            "| variant | seeds | protocol | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, v in variants.items():
            for p in ("unmasked", "masked"):
                cells = " | ".join(
                    _fmt(v["test"][p][m]) for m in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")
                )
                lines.append(f"| {name} ({v['scheme']}) | {len(v['seeds'])} | {p} | {cells} |")
        for name, pub in PUBLISHED.get(dataset, {}).items():
            cells = " | ".join(
                f"{pub[m]:.4f}" if m in pub else "–"
                for m in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")
            )
            lines.append(f"| published {name} | – | unmasked | {cells} |")
        lines += [
            "",
            "| variant | best epochs | s/epoch (median) | peak RSS MB | machine |",
            "|---|---|---|---|---|",
        ]
        for name, v in variants.items():
            cells = [str(v["best_epoch"]), f"{v['sec_per_epoch']:.1f}", f"{v['peak_rss_mb']:.0f}"]
            lines.append(f"| {name} | {' | '.join(cells)} | {'; '.join(v['machines'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report() -> dict[str, Any]:
    report = aggregate()
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed = 0
    if not args.report_only:
        # Seed-major order: a stopped run still leaves one seed of everything rather than three of one.
        for seed in args.seeds:
            for dataset in args.datasets:
                for variant in args.variants:
                    failed += run_one(dataset, variant, seed, args) is None
                    write_report()
    write_report()
    log.info("wrote %s and %s", REPORTS / "accuracy.json", REPORTS / "accuracy.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
