"""Data-parallel training: seconds per epoch and the final validation metric of one process against
several (torchrun, Gloo on the CPU), for the encoder (stage 1) and the fine-tuning stage.

    python -m bench.scale_train --dataset ml-100k --epochs 10 --ft-epochs 10 --seeds 0

Stage 1 trains `--objective sasrec --scheme allpos` for a fixed number of epochs (patience = epochs, so
every variant runs them all). The fine-tuning stage starts every variant from the one-process encoder
of the same seed (`--stage finetune --from`), so that it compares the fine-tuning alone; the vote and
the transition channel are not tuned (rank 0 tunes them alone, whatever the number of processes).
Variants: one process; N processes with the same per-process batch (the effective batch grows N-fold,
N times fewer steps per epoch); N processes with the batch divided by N (the one-process effective
batch and step count). Each run is a child process with the machine's load average recorded around
it; one result file per (stage, variant, seed) under runs/scale/, skipped when present. Writes
reports/scale.json and reports/scale.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPORTS, ROOT, RUNS, machine, machine_label, write_result

log = logging.getLogger("bench.scale_train")

ENCODER_BATCH, FT_BATCH = 256, 1024  # memrec train's defaults
THREADS_LINE = re.compile(r"using (\d+) CPU threads")
PREP_LINE = re.compile(r"memory bank: \d+ memories, states and retrieval in ([\d.]+)s")


@dataclass(frozen=True)
class Variant:
    """How many processes train, and the batch each takes (as a fraction of memrec's default)."""

    name: str
    processes: int
    batch_divisor: int = 1  # the per-process batch is the default divided by this

    def batch(self, default: int) -> int:
        return default // self.batch_divisor


def variants(n: int) -> list[Variant]:
    return [
        Variant("1 process", 1),
        Variant(f"{n} processes", n),
        Variant(f"{n} processes, batch / {n}", n, n),
    ]


def launcher(processes: int) -> list[str]:
    """The command before `train`: memrec itself, or torchrun starting ``processes`` copies of it."""
    if processes == 1:
        return [sys.executable, "-m", "service.cli"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*run, "-m", "service.cli"]


def recorded(processes: int, args: list[str]) -> str:
    """The command as a user types it, without machine paths."""
    program = ["memrec"] if processes == 1 else ["torchrun", "--standalone", f"--nproc-per-node={processes}"]
    program += [] if processes == 1 else ["-m", "service.cli"]
    text = shlex.join([*program, "train", *args])
    return text.replace(str(RUNS), "runs").replace(str(ROOT) + "/", "")


def load() -> float:
    return os.getloadavg()[0]


def run_train(processes: int, args: list[str], data_dir: str | None) -> tuple[dict[str, Any], str, float]:
    """`memrec train ARGS` in ``processes`` processes → (rank 0's JSON output, the log, wall seconds)."""
    cmd = [*launcher(processes), "train", *args, *(["--data-dir", data_dir] if data_dir else [])]
    log.info("running %s", recorded(processes, args))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{recorded(processes, args)} failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out, proc.stderr, wall


def measured(out: dict[str, Any], log_text: str, wall: float, load_before: float) -> dict[str, Any]:
    """What a result file keeps of a run: timings, epochs, validation and test metrics, threads, load."""
    threads = [int(t) for t in THREADS_LINE.findall(log_text)]
    prep = [float(s) for s in PREP_LINE.findall(log_text)]
    row = {
        "sec_per_epoch": out["sec_per_epoch"],
        "epochs_run": out["epochs_run"],
        "best_epoch": out["best_epoch"],
        "wall_seconds": wall,
        "valid": out["valid"]["unmasked"],
        "test": out["test"]["unmasked"],
        "threads_per_process": threads[0] if threads else None,
        "load_before": load_before,
        "load_after": load(),
    }
    if prep:  # the fine-tuning stage's states and retrieval, done by every process (the slowest shown)
        row["prep_seconds"] = max(prep)
    return row


def stage_args(stage: str, variant: Variant, seed: int, a: argparse.Namespace, out: Path) -> list[str]:
    common = ["--dataset", a.dataset, "--seed", str(seed), "--out", str(out), "--device", "cpu"]
    common += ["--threads", str(a.threads)] if a.threads else []
    if stage == "encoder":
        flags = ["--stage", "pretrain", "--objective", "sasrec", "--scheme", "allpos"]
        flags += ["--epochs", str(a.epochs), "--patience", str(a.epochs)]
        return [*common, *flags, "--batch-size", str(variant.batch(ENCODER_BATCH))]
    encoder = a.runs / f"encoder_1p_s{seed}"  # the one-process encoder: the stage alone differs
    flags = ["--stage", "finetune", "--from", str(encoder), "--no-vote", "--no-transitions"]
    flags += ["--ft-epochs", str(a.ft_epochs), "--ft-patience", str(a.ft_epochs)]
    return [*common, *flags, "--ft-batch-size", str(variant.batch(FT_BATCH))]


def run_one(stage: str, variant: Variant, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    """One (stage, variant, seed) run, or its result file when it exists."""
    tag = f"{variant.processes}p" + (f"_div{variant.batch_divisor}" if variant.batch_divisor > 1 else "")
    result_file = a.runs / f"{stage}_{tag}_s{seed}.json"
    if result_file.is_file():
        log.info("%s exists, skipping", result_file.name)
        record: dict[str, Any] = json.loads(result_file.read_text())
        return record
    args = stage_args(stage, variant, seed, a, a.runs / f"{stage}_{tag}_s{seed}")
    before = load()
    out, log_text, wall = run_train(variant.processes, args, a.data_dir)
    default = ENCODER_BATCH if stage == "encoder" else FT_BATCH
    record = {
        "stage": stage,
        "variant": variant.name,
        "processes": variant.processes,
        "batch_per_process": variant.batch(default),
        "effective_batch": variant.processes * variant.batch(default),
        "seed": seed,
        "command": recorded(variant.processes, args),
        **measured(out, log_text, wall, before),
    }
    write_result(result_file, record)  # with the machine and the date
    written: dict[str, Any] = json.loads(result_file.read_text())
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data-dir", default=None, help="folder of the datasets (default: memrec's)")
    p.add_argument("--processes", type=int, default=2, help="N, compared with one process")
    p.add_argument("--epochs", type=int, default=10, help="encoder epochs (all run)")
    p.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs (all run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=None, help="per process (default: memrec's choice)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.runs = RUNS / "scale" / a.dataset
    a.runs.mkdir(parents=True, exist_ok=True)
    rows = [
        run_one(stage, variant, seed, a)
        for seed in a.seeds
        for stage in ("encoder", "finetune")
        for variant in variants(a.processes)
    ]
    command = f"python -m bench.scale_train --dataset {a.dataset} --epochs {a.epochs}"
    command += f" --ft-epochs {a.ft_epochs} --processes {a.processes} --seeds {' '.join(map(str, a.seeds))}"
    command += f" --threads {a.threads}" if a.threads else ""
    report = {"dataset": a.dataset, "command": command, "machine": machine(), "runs": rows}
    (REPORTS / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / "scale.md").write_text(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Data-parallel training: one process against several",
        "",
        f"`{report['command']}` on {machine_label(report['machine'])}; torch {report['machine']['torch']},",
        "Gloo between the processes. Each run's command, date and the one-minute load average before",
        "and after it are in `reports/scale.json`; timings are comparable only within this report.",
        "",
    ]
    for stage, title in (("encoder", "Stage 1: encoder"), ("finetune", "Stage 2: fine-tuning")):
        runs = [r for r in report["runs"] if r["stage"] == stage]
        lines += [f"## {title}", "", _table_head(stage)]
        lines += [_table_row(r, stage) for r in runs]
        lines += ["", *_ratios(runs), ""]
    lines += ["## Reading", "", *_reading(report), "", "## Commands", ""]
    lines += [f"- `{r['command']}`" for r in report["runs"]]
    return "\n".join(lines) + "\n"


def _table_head(stage: str) -> str:
    prep = " prep s |" if stage == "finetune" else ""
    head = "| variant | seed | batch / process | effective batch | threads / process | s/epoch |"
    head += f"{prep} epochs | wall s | valid NDCG@10 | valid HR@10 | test NDCG@10 | load before → after |"
    return head + "\n" + "|---" * (12 + (1 if prep else 0)) + "|"


def _table_row(r: dict[str, Any], stage: str) -> str:
    cells = [r["variant"], str(r["seed"]), str(r["batch_per_process"]), str(r["effective_batch"])]
    cells += [str(r["threads_per_process"]), f"{r['sec_per_epoch']:.1f}"]
    cells += [f"{r['prep_seconds']:.0f}"] if stage == "finetune" else []
    cells += [str(r["epochs_run"]), f"{r['wall_seconds']:.0f}"]
    cells += [f"{r['valid']['ndcg@10']:.4f}", f"{r['valid']['hr@10']:.4f}", f"{r['test']['ndcg@10']:.4f}"]
    cells.append(f"{r['load_before']:.1f} → {r['load_after']:.1f}")
    return "| " + " | ".join(cells) + " |"


def _reading(report: dict[str, Any]) -> list[str]:
    """What the figures say about this machine, from the recorded threads, loads and timings."""
    runs = report["runs"]
    loads = [x for r in runs for x in (r["load_before"], r["load_after"])]
    threads = sorted({(r["processes"], r["threads_per_process"]) for r in runs})
    used = ", ".join(f"{p} × {t} thread(s)" for p, t in threads)
    out = [
        f"- The machine has {report['machine']['cores']} cores; the one-minute load average was"
        f" {min(loads):.1f}–{max(loads):.1f} during the runs, other jobs included. memrec's default"
        " thread count (the free cores, shared by the processes of the machine) gave processes ×"
        f" threads: {used}.",
        "- Each step of N processes all-reduces the gradients over Gloo, and processes on one machine"
        " share its cores and memory bandwidth: N processes cannot beat the one-process rate N-fold"
        " unless each has cores of its own.",
    ]
    ft = [r for r in runs if r["stage"] == "finetune" and r["batch_per_process"] == FT_BATCH]
    for one in [r for r in ft if r["processes"] == 1]:
        for many in [r for r in ft if r["processes"] > 1 and r["seed"] == one["seed"]]:
            out.append(
                "- Fine-tuning first encodes and searches every training sample, in every process:"
                f" {many['prep_seconds']:.0f} s with {many['processes']} processes against"
                f" {one['prep_seconds']:.0f} s with one (seed {one['seed']}); the whole fine-tuning run"
                f" took {many['wall_seconds']:.0f} s against {one['wall_seconds']:.0f} s."
            )
    return out


def _ratios(runs: list[dict[str, Any]]) -> list[str]:
    """Each variant's seconds per epoch against the one-process run of the same seed."""
    base = {r["seed"]: r["sec_per_epoch"] for r in runs if r["processes"] == 1}
    out = []
    for r in runs:
        if r["processes"] > 1 and r["seed"] in base:
            ratio = base[r["seed"]] / r["sec_per_epoch"]
            out.append(f"- {r['variant']}, seed {r['seed']}: {ratio:.2f}× the one-process epoch rate.")
    return out


if __name__ == "__main__":
    sys.exit(main())
