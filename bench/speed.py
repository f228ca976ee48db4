"""Training speed: seconds per epoch for each objective and batching scheme, and evaluation time.

    python -m bench.speed --dataset beauty --threads 2

Times a random sample of one epoch's batches (after warm-up) and extrapolates to the whole epoch, then
times a full validation evaluation. Writes `reports/speed.json` and `reports/speed.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from bench.common import REPORTS, machine, machine_label
from model.data import SameTargetIndex, bucket_batches, leave_one_out, load_dataset, window_samples
from model.sasrec import EncoderConfig, SASRec
from model.train import TrainConfig, batch_loss, evaluate_encoder

log = logging.getLogger("bench.speed")

CASES = [("sasrec", "prefix"), ("pretrain", "prefix"), ("sasrec", "allpos"), ("pretrain", "allpos")]


def time_epoch(objective: str, scheme: str, args: argparse.Namespace) -> dict[str, Any]:
    data = load_dataset(args.dataset, args.data_dir)
    split = leave_one_out(data)
    model = SASRec(EncoderConfig(n_items=data.vocab.n_items)).to(args.device)
    cfg = TrainConfig(objective=objective, scheme=scheme, device=args.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(0)
    positives = SameTargetIndex(split.train.targets)
    train_idx = (
        window_samples(split.train, 50) if scheme == "allpos" else np.arange(len(split.train), dtype=np.int64)
    )
    batches = [train_idx[b] for b in bucket_batches(split.train.lengths[train_idx], cfg.batch_size, rng)]
    sample = rng.choice(len(batches), size=min(args.batches, len(batches)), replace=False)
    model.train()
    times = []
    for i, b in enumerate([*sample[:3], *sample]):  # three warm-up batches
        t0 = time.perf_counter()
        loss = batch_loss(model, split.train, batches[b], cfg, positives, rng, torch.device(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    evaluate_encoder(model, split.test, split.test_seen, cfg)
    eval_s = time.perf_counter() - t0
    tokens = int(split.train.lengths[train_idx].sum())
    return {
        "objective": objective,
        "scheme": scheme,
        "batches_per_epoch": len(batches),
        "encoder_tokens_per_epoch": tokens,
        "ms_per_batch_median": 1000 * float(np.median(times)),
        "sec_per_epoch": float(np.mean(times)) * len(batches),
        "test_eval_sec": eval_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="beauty")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batches", type=int, default=40, help="batches timed per case")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [time_epoch(o, s, args) for o, s in CASES]
    for r in rows:
        log.info("%s", r)
    # As a user types it; the data come from $MEMREC_DATA_DIR.
    command = f"python -m bench.speed --dataset {args.dataset} --threads {torch.get_num_threads()}"
    report = {
        "dataset": args.dataset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": 0,
        "cases": rows,
    }
    key = f"{args.dataset}.{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    path = REPORTS / "speed.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing[key] = report
    path.write_text(json.dumps(existing, indent=2) + "\n")
    (REPORTS / "speed.md").write_text(markdown(existing))
    return 0


def markdown(all_reports: dict[str, Any]) -> str:
    lines = ["# Training speed", ""]
    for key, r in all_reports.items():
        lines += [
            f"## {key}",
            "",
            f"`{r['command']}` on {machine_label(r['machine'])}, {r['threads']} torch threads, {r['date']}.",
            "Each case times a random sample of one epoch's batches and extrapolates; batch 256.",
            "",
            "| objective | scheme | batches/epoch | encoder tokens | ms/batch | s/epoch | test eval s |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in r["cases"]:
            cells = [c["objective"], c["scheme"], str(c["batches_per_epoch"])]
            cells += [f"{c['encoder_tokens_per_epoch']:,}", f"{c['ms_per_batch_median']:.1f}"]
            cells += [f"{c['sec_per_epoch']:.1f}", f"{c['test_eval_sec']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
