"""The ``memrec`` command line: ``memrec train``, ``evaluate``, ``serve``, ``reindex`` and ``export``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from model import artifact, distributed, offline
from model import hybrid as hy
from model import transitions as tr
from model.data import DataError, Interactions, Split, first_items, leave_one_out, load_dataset
from model.distributed import Dist
from model.evaluate import head_items
from model.finetune import FinetuneConfig, TestRun, evaluate_on_test, finetune
from model.fusion import FusionConfig
from model.inference import InferenceConfig
from model.predictor import from_artifact
from model.sasrec import EncoderConfig, SASRec
from model.threads import apply_threads, choose_threads
from model.train import OBJECTIVES, SCHEMES, TrainConfig, evaluate_encoder, train
from model.user_memory import QUALITIES, MemoryRules, build_table
from model.vote import Vote, VoteGrid
from model.warm_start import transfer

log = logging.getLogger("memrec")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data-dir", help="folder holding the datasets (default: $MEMREC_DATA_DIR or ./data)")
    p.add_argument(
        "--dataset", required=required, help="ml-100k, beauty, sports, toys, yelp, lastfm or a file"
    )
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and FAISS (default: the cores not busy, from the load average)",
    )


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
    t.add_argument(
        "--stage",
        choices=("all", "pretrain", "finetune"),
        default="all",
        help="all: pre-train → memory bank → fine-tune; pretrain: the encoder only; "
        "finetune: memory bank and fusion on the encoder of --from",
    )
    t.add_argument(
        "--from", dest="from_dir", type=Path, help="model directory whose encoder --stage finetune uses"
    )
    t.add_argument(
        "--init-from",
        type=Path,
        help="start pre-training from this model directory's encoder weights instead of random ones "
        "(e.g. add the retrieval objective to a trained SASRec, or retrain on an export with new items: "
        "known items keep their rows, new ones start from their predecessors'); same encoder shape",
    )
    f = t.add_argument_group("retrieval fusion")
    f.add_argument("--k", type=int, default=20, help="memories retrieved per query")
    f.add_argument("--alpha", type=float, default=0.5, help="weight of the encoder state in the mix")
    f.add_argument("--beta", type=float, default=1.0, help="weight of the seq→tar channel")
    f.add_argument("--fusion-dropout", type=float, default=0.5)
    f.add_argument("--residual-norm", action="store_true", help="residual + LayerNorm around cross-attention")
    f.add_argument("--gate", action="store_true", help="learned capped gate instead of the fixed alpha")
    f.add_argument("--similarity-bias", action="store_true", help="add retrieval similarity to attention")
    f.add_argument("--adaptive-k", action="store_true", help="RAMRec's entropy rule picks K ≤ --k per query")
    f.add_argument("--cross-user", action="store_true", help="retrieve other users' memories only")
    f.add_argument(
        "--user-memories", action="store_true", help="fuse each user's own memories (RAMRec) as extra slots"
    )
    f.add_argument(
        "--user-memory-slots", type=int, default=75, help="user memories (RAMRec's C) kept per user"
    )
    f.add_argument(
        "--memory-quality",
        choices=QUALITIES,
        default="recency_frequency",
        help="eviction order of the user memories (fewest_accesses: RAMRec's original)",
    )
    f.add_argument(
        "--vote",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="choose the memory vote (the nearest memories' next items mixed into the scores) on "
        "validation after fine-tuning; it stays off where it does not help there (--no-vote: skip)",
    )
    grid = VoteGrid()
    f.add_argument("--vote-weights", type=float, nargs="+", default=list(grid.weights), help="λ candidates")
    f.add_argument(
        "--vote-temperatures", type=float, nargs="+", default=list(grid.temperatures), help="τ candidates"
    )
    f.add_argument("--vote-depths", type=int, nargs="+", default=list(grid.depths), help="voter counts")
    f.add_argument(
        "--vote-min-z",
        type=float,
        default=2.0,
        help="the vote stays off unless its validation NDCG@10 gain is this many standard errors",
    )
    f.add_argument(
        "--transitions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="choose the transition channel (the memories' item transitions mixed into the scores) on "
        "validation after the vote, by the vote's rule, then the learned hybrid (per-query weights of the "
        "model and the transitions) against it; each stays off where it does not help there",
    )
    f.add_argument("--ft-epochs", type=int, default=100)
    f.add_argument("--ft-patience", type=int, default=10)
    f.add_argument("--ft-lr", type=float, default=1e-3)
    f.add_argument("--ft-batch-size", type=int, default=1024)

    e = sub.add_parser("evaluate", help="full-ranking test metrics of a model directory")
    e.add_argument("--model", required=True, type=Path, help="model directory written by `memrec train`")
    _add_data_args(e, required=False)
    e.add_argument("--split", choices=("test", "valid"), default="test")

    s = sub.add_parser("serve", help="serve a model directory over HTTP (settings: MEMREC_* variables)")
    s.add_argument("--model", dest="model_dir", type=Path, help="model directory (or MEMREC_MODEL_DIR)")
    s.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--redis-url", help="Redis URL (default: the embedded store in --store-dir)")
    s.add_argument("--store-dir", type=Path, help="embedded store folder (default var/store)")
    s.add_argument("--threads", dest="torch_threads", type=int, help="torch and FAISS threads (default 1)")
    s.add_argument("--workers", type=int, help="server processes (default 1; more need --redis-url)")

    r = sub.add_parser("reindex", help="load a model's memory bank into the store and snapshot the index")
    r.add_argument("--model", dest="model_dir", type=Path, help="model directory (or MEMREC_MODEL_DIR)")
    r.add_argument("--redis-url", help="Redis URL (default: the embedded store in --store-dir)")
    r.add_argument("--store-dir", type=Path, help="store folder: embedded data or Redis index snapshots")

    x = sub.add_parser(
        "export", help="write the store's interaction log as a RecBole .inter file for `memrec train`"
    )
    x.add_argument("--out", required=True, type=Path, help=".inter file to write")
    x.add_argument("--model", dest="model_dir", type=Path, help="model directory (or MEMREC_MODEL_DIR)")
    x.add_argument("--redis-url", help="Redis URL (default: the embedded store in --store-dir)")
    x.add_argument("--store-dir", type=Path, help="store folder: embedded data or Redis index snapshots")
    x.add_argument(
        "--with-training-data",
        action="store_true",
        help="the model's training data first (the data set it was trained on), then the log",
    )
    x.add_argument("--training-data", type=Path, help="another training data file to put first")
    x.add_argument(
        "--data-dir", type=Path, help="folder of the known data sets (default: $MEMREC_DATA_DIR or ./data)"
    )
    x.add_argument("--after", default="", help="only the log rows after this position (an earlier export's)")
    return parser


def _service_overrides(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_reindex(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from service.reindex import reindex
    from service.settings import Settings

    try:
        settings = Settings(**_service_overrides(args, ("model_dir", "redis_url", "store_dir")))
        out = asyncio.run(reindex(settings))
    except (ValidationError, artifact.ArtifactError, ConnectionError) as e:
        log.error("%s", e)
        return 2
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from memory_store.base import StoreInUse
    from service.export import export
    from service.settings import Settings

    try:
        settings = Settings(**_service_overrides(args, ("model_dir", "redis_url", "store_dir", "data_dir")))
        with_training = args.with_training_data or args.training_data is not None
        out = asyncio.run(export(settings, args.out, with_training, args.training_data, args.after))
    except (ValidationError, artifact.ArtifactError, DataError, ConnectionError, StoreInUse) as e:
        log.error("%s", e)  # StoreInUse: the embedded store of a running server (stop it first)
        return 2
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve  # the service (FastAPI, Redis) loads only for this command

    names = ("model_dir", "host", "port", "redis_url", "store_dir", "torch_threads", "workers")
    return serve(_service_overrides(args, names))


def _load_initial_weights(model: SASRec, data: Interactions, split: Split, model_dir: Path) -> None:
    """Start ``model`` at a trained encoder; only its weights are taken, so dropout and the training
    objective are this run's. The item vocabulary may have grown or shrunk (model.warm_start); another
    shape is refused."""
    base = artifact.load(model_dir)
    try:
        moved = transfer(base.encoder, base.vocab, model, data.vocab, split.train)
    except DataError as e:
        raise DataError(f"--init-from {model_dir}: {e}") from None
    if not moved.kept:
        raise DataError(f"--init-from {model_dir}: its encoder knows none of these items")
    log.info("initial encoder weights from %s (model version %s)", model_dir, base.model_version)


def _pretrain(
    args: argparse.Namespace, data: Interactions, split: Split, dist: Dist
) -> tuple[SASRec, dict[str, Any]]:
    """Train the encoder; its metrics (test included) from rank 0, only its config from the others."""
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
    torch.manual_seed(args.seed)  # the initial weights too: the same command gives the same model
    model = SASRec(enc_cfg)
    if args.init_from is not None:
        _load_initial_weights(model, data, split, args.init_from)
    ckpt_dir = args.out / "checkpoints"
    if dist.main:  # one writer: the other processes never touch the model directory
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not args.resume and (ckpt_dir / "checkpoint.pt").exists():
            (ckpt_dir / "checkpoint.pt").unlink()
    result = train(model, split, cfg, checkpoint_dir=ckpt_dir, dist=dist)
    if not dist.main:
        return model.cpu(), {"train_config": cfg.to_json()}
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "sec_per_epoch": result.sec_per_epoch,
        "train_seconds": result.train_seconds,  # every epoch, also those of an earlier session
        "valid": result.best_valid,
        "test": evaluate_encoder(
            model, split.test, split.test_seen, cfg, head_items(split.train.targets, enc_cfg.n_items)
        ),
        "train_config": cfg.to_json(),
    }
    if dist.on:
        metrics["processes"] = dist.world_size  # each trained on 1/N of every epoch, N × batch per step
    return model.cpu(), metrics


def _store_rules() -> MemoryRules:
    from service.memory_rules import store_rules  # the store's code loads only for user memories

    return store_rules()


def _finetune(
    args: argparse.Namespace,
    encoder: SASRec,
    split: Split,
    retrieve: offline.Retrieve = offline.nearest,
    dist: Dist = distributed.SINGLE,
) -> tuple[TestRun, dict[str, Any], FinetuneConfig] | None:
    """Fine-tune, tune and test: the test-time model, the metrics it reports, its training config.
    ``retrieve``: how memories are retrieved (the benchmarks' controls substitute theirs). Under
    torchrun every process fine-tunes its shard, rank 0 alone tunes and tests: None elsewhere."""
    fusion_cfg = FusionConfig(
        dim=encoder.cfg.dim,
        n_heads=encoder.cfg.n_heads,
        inner_dim=encoder.cfg.inner_dim,
        dropout=args.fusion_dropout,
        alpha=args.alpha,
        beta=args.beta,
        residual_norm=args.residual_norm,
        gate=args.gate,
        similarity_bias=args.similarity_bias,
        user_memories=args.user_memories,
    )
    cfg = FinetuneConfig(
        epochs=args.ft_epochs,
        patience=args.ft_patience,
        lr=args.ft_lr,
        batch_size=args.ft_batch_size,
        user_memory_slots=args.user_memory_slots,
        memory_quality=args.memory_quality,
        tune_vote=args.vote,
        tune_transitions=args.transitions,
        seed=args.seed,
        device=args.device,
    )
    inference = InferenceConfig(
        k=args.k, adaptive_k=args.adaptive_k, cross_user=args.cross_user, user_memories=args.user_memories
    )
    t0 = time.perf_counter()
    grid = VoteGrid(tuple(args.vote_weights), tuple(args.vote_temperatures), tuple(args.vote_depths))
    rules = _store_rules() if args.user_memories else None
    model, result = finetune(
        encoder, split, fusion_cfg, cfg, inference, grid, args.vote_min_z, rules, retrieve, dist
    )
    if not dist.main:
        return None
    run = evaluate_on_test(model, split, args.device, retrieve)
    chosen = run.predictor.cfg
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "sec_per_epoch": float(sorted(e.seconds for e in result.history)[len(result.history) // 2]),
        "train_seconds": time.perf_counter() - t0,
        "memories": len(run.bank),
        "valid": result.best_valid,
        "test": run.metrics,
    }
    if dist.on:
        metrics["processes"] = dist.world_size
    if result.vote is not None and result.vote.table:
        tuned = result.vote
        vote: dict[str, Any] = {"chosen": chosen.vote.to_json(), "valid": tuned.table}
        if result.vote_grid is not None:
            vote["grid"] = asdict(result.vote_grid)
        z = tuned.z if math.isfinite(tuned.z) else None  # None: a gain without any spread
        vote["z"], vote["min_z"] = z, args.vote_min_z
        # the validation winner z belongs to: the chosen vote, or the one the rule refused (None: off won)
        vote["candidate"] = tuned.candidate.to_json() if tuned.candidate else None
        metrics["vote"] = vote
        if chosen.vote.on:  # the same fusion without the vote, on the same test queries: the paired effect
            vote["test_without_vote"] = run.evaluate(replace(chosen, vote=Vote()), split, args.device)
    if result.transitions is not None:
        metrics["transitions"] = _transitions_report(result.transitions, args.vote_min_z)
        if chosen.reads_transitions:  # the same model without the channel, on the same test queries
            off = replace(chosen, transitions=replace(chosen.transitions, weight=0.0), hybrid=None)
            metrics["transitions"]["test_without_transitions"] = run.evaluate(off, split, args.device)
    if result.hybrid is not None:
        metrics["hybrid"] = _hybrid_report(result.hybrid, args.vote_min_z)
        if chosen.hybrid is not None:  # the same model with the tuned channel instead: the paired effect
            channel = replace(chosen, hybrid=None)
            metrics["hybrid"]["test_with_channel"] = run.evaluate(channel, split, args.device)
    return run, metrics, cfg


def _hybrid_report(tuned: hy.TuneResult, min_z: float) -> dict[str, Any]:
    return {
        "kept": tuned.best is not None,
        "valid": tuned.table,  # the tuned channel, then the hybrid without and with gates, cross-fitted
        "gated": tuned.gated,  # the gates beat the hybrid without them by the rule (z_gates ≥ min_z)
        "z_gates": tuned.z_gates,
        "z": tuned.z,  # the chosen form over the channel
        "min_z": min_z,
        "fitted": tuned.fitted.to_json() if tuned.fitted is not None else None,
    }


def _transitions_report(tuned: tr.TuneResult, min_z: float) -> dict[str, Any]:
    return {
        "chosen": tuned.best.to_json(),
        "valid": tuned.table,
        "z": tuned.z if math.isfinite(tuned.z) else None,  # None: a gain without any spread
        "min_z": min_z,
        "candidate": tuned.candidate.to_json() if tuned.candidate else None,
    }


def cmd_train(args: argparse.Namespace, retrieve: offline.Retrieve = offline.nearest) -> dict[str, Any]:
    """Train and write the model directory; under torchrun (WORLD_SIZE > 1) as one of its processes,
    data-parallel (model.distributed): only rank 0 writes and returns the metrics, the others {}."""
    dist = distributed.init(args.device)
    try:
        out = _train_job(args, retrieve, dist)
        distributed.barrier(dist)  # the others wait here while rank 0 tests and writes the model
        return out
    finally:
        distributed.close(dist)


def _train_job(args: argparse.Namespace, retrieve: offline.Retrieve, dist: Dist) -> dict[str, Any]:
    data = load_dataset(args.dataset, args.data_dir)
    if args.stage == "finetune":
        if args.from_dir is None:
            raise DataError("--stage finetune needs --from DIR, a model directory with a trained encoder")
        base = artifact.load(args.from_dir, device=args.device)
        data = data.with_vocab(base.vocab)
        encoder, enc_metrics = base.encoder, base.metrics.get("encoder", base.metrics)
        train_config = base.train_config
        split = leave_one_out(data, encoder.cfg.max_len)
    else:
        split = leave_one_out(data, args.max_len)
        encoder, enc_metrics = _pretrain(args, data, split, dist)
        train_config = enc_metrics.pop("train_config")
    art = artifact.Artifact(
        encoder,
        data.vocab,
        data.name,
        train_config=train_config,
        dataset_file=data.source,
        data_until=data.until,
    )
    if args.stage == "pretrain":
        art.metrics = {**enc_metrics, "encoder": dict(enc_metrics)}
    else:
        tested = _finetune(args, encoder.to(args.device), split, retrieve, dist)
        if tested is None:  # another process than rank 0: its share of the training is done
            return {}
        run, ft_metrics, ft_cfg = tested
        assert run.predictor.fusion is not None
        art.fusion, art.bank, art.finetune_config = run.predictor.fusion.cpu(), run.bank, ft_cfg.to_json()
        art.inference = run.predictor.cfg.to_json()
        art.first_items = first_items(data)
        art.encoder = encoder.cpu()
        art.metrics = {**ft_metrics, "encoder": enc_metrics}
    if not dist.main:
        return {}
    art.metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    artifact.save(art, args.out)
    log.info("wrote %s (model version %s)", args.out, art.model_version)
    return {"model_dir": str(args.out), "model_version": art.model_version, **art.metrics}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    art = artifact.load(args.model, device=args.device)
    data = load_dataset(args.dataset or art.dataset, args.data_dir).with_vocab(art.vocab)
    split = leave_one_out(data, art.encoder.cfg.max_len)
    samples, seen = (split.test, split.test_seen) if args.split == "test" else (split.valid, split.valid_seen)
    out: dict[str, Any] = {"model_version": art.model_version, "dataset": data.name, "split": args.split}
    head = head_items(split.train.targets, art.vocab.n_items)
    encoder_metrics = evaluate_encoder(art.encoder, samples, seen, TrainConfig(device=args.device), head)
    if art.fusion is None or art.bank is None:
        out.update(encoder_metrics)
        return out
    predictor = from_artifact(art)
    cfg = predictor.cfg
    user_items = None
    if cfg.user_memories:
        um_cfg = FinetuneConfig.from_json(art.finetune_config).user_memory()
        user_items = build_table(art.encoder, split, um_cfg, _store_rules(), args.device).lookup(samples)
    rows = None
    if cfg.reads_transitions:
        # The bank holds the validation pairs too; counted, they would hand each validation query its
        # own target. Validation counts the training pairs' transitions, as tuning did.
        train = split.train
        counted = (train.targets, tr.recent_items(train.inputs, train.lengths))
        rows = (
            tr.follower_rows(*counted, cfg.transition_order)
            if args.split == "valid"
            else offline.bank_rows(art.bank, cfg.transition_order)
        )
    queries = offline.prepare(predictor, art.bank, samples, args.device, user_items=user_items)
    out.update(offline.evaluate_predictor(predictor, queries, samples, seen, rows, args.device, head))
    out["encoder"] = encoder_metrics
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    place = distributed.from_env()
    # Several processes log to one terminal under torchrun: each line names its process.
    who = f"[{place.rank}/{place.world_size}] " if place.on else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
    )
    if place.on and args.command != "train":
        log.error("only `memrec train` runs under torchrun; start `memrec %s` as one process", args.command)
        return 2
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "reindex":
        return cmd_reindex(args)
    if args.command == "export":
        return cmd_export(args)
    return run_job(args, cmd_train if args.command == "train" else cmd_evaluate)


def run_job(args: argparse.Namespace, job: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Run a training or evaluation ``job`` on the cores other processes leave free (shared by the
    processes torchrun starts on this machine) and print its JSON (rank 0's alone under torchrun);
    exit status 2, with the message logged, for bad data or a bad model directory."""
    place = distributed.from_env()
    apply_threads(choose_threads(args.threads, processes=place.local_world_size))
    try:
        out = job(args)
    except (DataError, artifact.ArtifactError) as e:
        log.error("%s", e)
        return 2
    if place.main:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
