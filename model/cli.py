"""The ``memrec`` command line: ``memrec train`` and ``memrec evaluate``."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model import artifact
from model.data import DataError, leave_one_out, load_dataset
from model.sasrec import EncoderConfig, SASRec
from model.train import OBJECTIVES, SCHEMES, TrainConfig, evaluate_encoder, train

log = logging.getLogger("memrec")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data-dir", help="folder holding the datasets (default: $MEMREC_DATA_DIR or ./data)")
    p.add_argument(
        "--dataset", required=required, help="ml-100k, beauty, sports, toys, yelp, lastfm or a file"
    )
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memrec", description="Retrieval-augmented sequential recommendation"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an encoder and write a model directory")
    _add_data_args(t, required=True)
    t.add_argument("--out", required=True, type=Path, help="model directory to write")
    t.add_argument("--objective", choices=OBJECTIVES, default="pretrain")
    t.add_argument("--scheme", choices=SCHEMES, default="prefix")
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--patience", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--dropout", type=float, default=0.5)
    t.add_argument("--max-len", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/checkpoint.pt if any")

    e = sub.add_parser("evaluate", help="full-ranking test metrics of a model directory")
    e.add_argument("--model", required=True, type=Path, help="model directory written by `memrec train`")
    _add_data_args(e, required=False)
    e.add_argument("--split", choices=("test", "valid"), default="test")
    return parser


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    data = load_dataset(args.dataset, args.data_dir)
    split = leave_one_out(data, args.max_len)
    enc_cfg = EncoderConfig(
        n_items=data.vocab.n_items, max_len=args.max_len, dropout=args.dropout, attn_dropout=args.dropout
    )
    cfg = TrainConfig(
        objective=args.objective,
        scheme=args.scheme,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    model = SASRec(enc_cfg)
    ckpt_dir = args.out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume and (ckpt_dir / "checkpoint.pt").exists():
        (ckpt_dir / "checkpoint.pt").unlink()
    t0 = time.perf_counter()
    result = train(model, split, cfg, checkpoint_dir=ckpt_dir)
    test = evaluate_encoder(model, split.test, split.test_seen, cfg)
    metrics = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "sec_per_epoch": result.sec_per_epoch,
        "train_seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "valid": result.best_valid,
        "test": test,
    }
    art = artifact.Artifact(model.cpu(), data.vocab, data.name, train_config=cfg.to_json(), metrics=metrics)
    artifact.save(art, args.out)
    log.info("wrote %s (model version %s)", args.out, art.model_version)
    return {"model_dir": str(args.out), "model_version": art.model_version, **metrics}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    art = artifact.load(args.model, device=args.device)
    data = load_dataset(args.dataset or art.dataset, args.data_dir).with_vocab(art.vocab)
    split = leave_one_out(data, art.encoder.cfg.max_len)
    samples, seen = (split.test, split.test_seen) if args.split == "test" else (split.valid, split.valid_seen)
    metrics = evaluate_encoder(art.encoder, samples, seen, TrainConfig(device=args.device))
    return {"model_version": art.model_version, "dataset": data.name, "split": args.split, **metrics}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        out = cmd_train(args) if args.command == "train" else cmd_evaluate(args)
    except (DataError, artifact.ArtifactError) as e:
        log.error("%s", e)
        return 2
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
