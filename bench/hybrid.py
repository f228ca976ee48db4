"""The learned hybrid on the archived encoders → ``reports/hybrid.json`` and ``.md``.

    python -m bench.hybrid --runs beauty.pretrain ml-100k.sasrec_allpos sports.pretrain_warm \
        toys.pretrain_warm --seeds 0 1 2

Each archived encoder (reports/encoders/, seeds differ in the whole encoder) goes through the product's
tuning (model.tuning) exactly as ``memrec train`` runs it after fine-tuning, here without the fusion and
the vote: the transition channel's order and λ on validation, then the learned hybrid (model.hybrid)
fitted on validation and cross-fitted against that channel. Test rows: the encoder alone, with the tuned
channel, and with the hybrid (whether or not validation kept it: ``kept`` says), ranked by the product's
predictor and evaluator; transitions come from the training pairs for validation and also from the
validation pairs for test, never from a test target. Beside them, the parameter-free baselines of
reports/baselines.json on the same test queries, and per seed the paired difference of the hybrid to the
strongest of them and to the encoder. One result file per (run, seed) in ``reports/hybrid_runs/``; the
report aggregates what exists (``--report-only``: nothing is computed).

    python -m bench.hybrid --defaults runs/hybrid/beauty-seed0 runs/hybrid/beauty-seed1 --report-only

records models ``memrec train`` built with its defaults (the fusion, the vote, the channel and the
hybrid, each kept where validation finds a gain; fine-tuned from an archived encoder of the same seed):
their test metrics and, paired on the same model, the metrics with the tuned channel in the hybrid's
place (``reports/hybrid_runs/default/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import baselines, transition_mix
from bench.accuracy import ENCODERS
from bench.common import REPORTS, fmt, stamp, stat, write_result
from bench.retrieval import RESULTS as RETRIEVAL_RUNS
from model import artifact, offline, tuning
from model import hybrid as hy
from model import transitions as tr
from model.data import Samples, leave_one_out, load_dataset
from model.inference import InferenceConfig
from model.memory import encode_samples
from model.predictor import Predictor

log = logging.getLogger("bench.hybrid")

RESULTS = REPORTS / "hybrid_runs"
DEFAULTS = RESULTS / "default"  # the product default, as memrec train builds it
ARMS = ("encoder", "channel", "hybrid")
# What each part of the hybrid adds: refitted on validation with the gates forced on or off, or without
# some features (set to 0, so their weights stay 0) in the form validation chose (None), scored on test
# like the others: {name: (features dropped, gated)}.
ABLATIONS: dict[str, tuple[tuple[str, ...], bool | None]] = {
    "with gates": ((), True),  # the weights move with the query, whether or not validation chose it
    "no gates": ((), False),  # one weight per source for every query
    "no history": (("seen", "last"), None),  # no feature of the query's own window
    "no positions": (tuple(f"share_{j}" for j in range(1, tr.MAX_ORDER + 1)), None),  # p_trans alone
}
PROTOCOLS = ("unmasked", "masked")
STRONGEST = "transitions_tuned_popularity_tiebreak"  # the strongest parameter-free baseline (bench.baselines)
# The baselines of a dataset's table (bench.baselines keys): under the models' tie rule (ties against
# the target), and with the popularity tie-break that makes the last two the strongest of their kind.
BASELINE_ROWS = (
    "popularity",
    "last_item_markov",
    "last_item_markov_popularity_tiebreak",
    "transitions_tuned",
    STRONGEST,
)
# The default before the hybrid (fusion + vote + tuned channel): bench.retrieval's variant of that name.
BEFORE_HYBRID = "transitions"


def queries(predictor: Predictor, samples: Samples) -> offline.Queries:
    """Every sample encoded, no retrieval (the encoder alone)."""
    states = encode_samples(predictor.encoder, samples)
    plan = predictor.plan(states, offline.windows(samples), samples.users, prefix_lens=samples.prefix_lens)
    return offline.Queries(plan, None, None)


def counted(pairs: list[Samples]) -> dict[int, tr.Row]:
    items = np.concatenate([p.targets for p in pairs])
    recent = np.concatenate([tr.recent_items(p.inputs, p.lengths) for p in pairs])
    return tr.follower_rows(items, recent, tr.MAX_ORDER)


def run_one(name: str, seed: int, data_dir: str | None) -> dict[str, Any]:
    dataset = name.split(".")[0]
    art = artifact.load(ENCODERS / f"{name}.seed{seed}")
    data = load_dataset(dataset, data_dir).with_vocab(art.vocab)  # the encoder's ids
    split = leave_one_out(data, art.encoder.cfg.max_len)
    encoder = Predictor(art.encoder, None, InferenceConfig(k=0))
    valid_q = queries(encoder, split.valid)
    valid_rows = counted([split.train])
    t0 = time.perf_counter()
    channel = tuning.tune_transitions(encoder, valid_q, split.valid, valid_rows)
    with_channel = replace(encoder.cfg, transitions=channel.best)
    hybrid = tuning.tune_hybrid(encoder, valid_q, split.valid, valid_rows, channel.best)
    tuned_s = time.perf_counter() - t0
    assert hybrid.fitted is not None
    configs = {
        "encoder": encoder.cfg,
        "channel": with_channel,
        "hybrid": replace(with_channel, hybrid=hybrid.fitted),
    }
    with torch.inference_mode():
        cands = hy.candidates(tuning.hybrid_batches(encoder, valid_q, split.valid, valid_rows))
    for ablation, (dropped, gated) in ABLATIONS.items():
        form = hybrid.gated if gated is None else gated
        configs[ablation] = replace(with_channel, hybrid=hy.fit(without(cands, dropped), form))
    test_q = queries(encoder, split.test)
    test_rows = counted([split.train, split.valid])
    ranks = {
        arm: offline.evaluate_predictor(
            Predictor(art.encoder, None, cfg), test_q, split.test, split.test_seen, test_rows
        )
        for arm, cfg in configs.items()
    }
    return {
        "run": name,
        "seed": seed,
        "channel": channel.best.to_json(),
        "kept": hybrid.best is not None,
        "gated": hybrid.gated,  # validation chose the form with gates
        "valid": hybrid.table,
        "z": hybrid.z,
        "z_gates": hybrid.z_gates,
        "tune_seconds": round(tuned_s, 1),
        "hybrid": hybrid.fitted.to_json(),
        "test": {arm: {p: m[p] for p in PROTOCOLS} for arm, m in ranks.items()},
    }


def default_record(model_dir: Path) -> dict[str, Any]:
    """A model directory ``memrec train`` wrote → its result record: the test metrics, the same model
    with the tuned channel in the hybrid's place, and the choices validation made."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    metrics = config["metrics"]
    hybrid = metrics.get("hybrid")
    if hybrid is None:
        raise SystemExit(f"{model_dir}: not trained with the hybrid's tuning (memrec train --transitions)")
    with_channel = hybrid.get("test_with_channel", metrics["test"])  # refused: the channel is the model
    return {
        "dataset": config["dataset"],
        "seed": int(config["train"]["seed"]),  # the encoder's, which the fine-tune shares
        "model_version": config["model_version"],
        "kept": hybrid["kept"],
        "gated": hybrid.get("gated", True),  # a model trained before the gates had to earn their place
        "vote": metrics["vote"]["chosen"] if "vote" in metrics else None,
        "channel": metrics["transitions"]["chosen"],
        "test": {
            "default": {p: metrics["test"][p] for p in PROTOCOLS},
            "with channel": {p: with_channel[p] for p in PROTOCOLS},
        },
    }


def without(cands: hy.Candidates, dropped: tuple[str, ...]) -> hy.Candidates:
    """The candidates with the features ``dropped`` (item or query features) set to 0."""
    x, query = cands.x.clone(), cands.query.clone()
    for f in dropped:
        if f in hy.FEATURES:
            x[..., hy.FEATURES.index(f)] = 0.0
        else:
            query[:, hy.QUERY_FEATURES.index(f)] = 0.0
    return hy.Candidates(x, query, cands.present, cands.target)


def aggregate(command: str | None = None) -> dict[str, Any]:
    """The result files → the report; the date and machines are the runs' (the latest), the command
    ``command`` or, when None, one that reproduces the files (they are skipped when present)."""
    recs_all = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(RESULTS.glob("*.json"))]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in recs_all:
        runs.setdefault(str(r["run"]), []).append(r)
    if command is None:
        seeds = sorted({int(r["seed"]) for r in recs_all})
        args = ["--runs", *runs, "--seeds", *map(str, seeds)] if runs else []
        command = shlex.join(["python", "-m", "bench.hybrid", *args])
    measured = baselines.load(REPORTS / "baselines.json")
    strongest_of = {d: baselines.entries(m).get(STRONGEST) for d, m in measured.items()}
    out: dict[str, Any] = {}
    for name, recs in runs.items():
        strongest = strongest_of.get(name.split(".")[0])
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in recs],
            "kept": [r["kept"] for r in recs],
            "gated": [r.get("gated", True) for r in recs],  # a run from before the choice: gates
            "channels": [f"{r['channel']['order']}/{r['channel']['weight']:g}" for r in recs],
            "strongest_baseline": strongest["label"] if strongest else None,
        }
        ablated = [a for a in ABLATIONS if all(a in r["test"] for r in recs)]
        for p in PROTOCOLS:
            entry[p] = {
                arm: {m: stat([r["test"][arm][p][m] for r in recs]) for m in ("ndcg@10", "hr@10")}
                for arm in (*ARMS, *ablated)
            }
            if strongest:
                base = {m: strongest["test"][p][m]["mean"] for m in ("ndcg@10", "hr@10")}
                entry[p]["baseline"] = base
                gains = [r["test"]["hybrid"][p]["ndcg@10"] / base["ndcg@10"] - 1 for r in recs]
                entry[p]["gain_over_baseline"] = gains  # per seed, relative NDCG@10
            entry[p]["minus_encoder"] = [
                r["test"]["hybrid"][p]["ndcg@10"] - r["test"]["encoder"][p]["ndcg@10"] for r in recs
            ]
        out[name] = entry
    defaults: dict[str, Any] = {}
    for f in sorted(DEFAULTS.glob("*.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        defaults.setdefault(r["dataset"], []).append(r)
    default_out: dict[str, Any] = {}
    for dataset, recs in defaults.items():
        strongest = strongest_of.get(dataset)
        default_out[dataset] = {
            "seeds": [r["seed"] for r in recs],
            "kept": [r["kept"] for r in recs],
            "gated": [r.get("gated", True) for r in recs],
            **{
                p: {
                    arm: {m: stat([r["test"][arm][p][m] for r in recs]) for m in ("ndcg@10", "hr@10")}
                    for arm in ("default", "with channel")
                }
                for p in PROTOCOLS
            },
        }
        for p in PROTOCOLS:
            if strongest:
                base = strongest["test"][p]["ndcg@10"]["mean"]
                default_out[dataset][p]["gain_over_baseline"] = [
                    r["test"]["default"][p]["ndcg@10"] / base - 1 for r in recs
                ]
            default_out[dataset][p]["minus_channel"] = [
                r["test"]["default"][p]["ndcg@10"] - r["test"]["with channel"][p]["ndcg@10"] for r in recs
            ]
        recs_all += recs
    tables = {  # by run: one dataset may have runs on several encoders
        name: dataset_rows(name, runs[name], defaults.get(name.split(".")[0], []), measured) for name in runs
    }
    when, machines = stamp(recs_all)
    return {
        "command": command,
        "date": when,
        "machine": machines,
        "tables": tables,
        "runs": out,
        "defaults": default_out,
    }


def dataset_rows(
    name: str, recs: list[dict[str, Any]], defaults: list[dict[str, Any]], measured: dict[str, Any]
) -> list[dict[str, Any]]:
    """One dataset's table, top to bottom: the parameter-free baselines, the encoder ``name`` alone,
    with the tuned channel, the default before the hybrid (bench.retrieval's runs on that encoder), with
    the hybrid, the product default and the hybrid's ablations. A row: its label, its seeds and
    {protocol: {metric: stat}}; rows without results are left out."""
    dataset, encoder = name.split(".", 1)

    def row(label: str, seeds: list[int], tests: list[dict[str, Any]]) -> dict[str, Any]:
        by_protocol = {
            p: {m: stat([t[p][m] for t in tests]) for m in ("ndcg@10", "hr@10")} for p in PROTOCOLS
        }
        return {"label": label, "seeds": seeds, **by_protocol}

    rows = []
    measured_here = transition_mix.baseline_rows([dataset], measured).get(dataset, {})
    for key in BASELINE_ROWS:
        if key in measured_here:
            base = measured_here[key]
            rows.append(row(base["label"], [], [{p: base[p] for p in PROTOCOLS}]))
    seeds = [int(r["seed"]) for r in recs]
    rows.append(row("encoder alone", seeds, [r["test"]["encoder"] for r in recs]))
    rows.append(row("encoder + tuned channel", seeds, [r["test"]["channel"] for r in recs]))
    before = [
        json.loads(f.read_text(encoding="utf-8"))
        for f in sorted(RETRIEVAL_RUNS.glob(f"{dataset}.{encoder}.{BEFORE_HYBRID}.seed*.json"))
    ]
    if before:
        label = "default before the hybrid: fusion + vote + tuned channel"
        rows.append(row(label, [int(r["seed"]) for r in before], [r["test"] for r in before]))
    rows.append(row("encoder + learned hybrid", seeds, [r["test"]["hybrid"] for r in recs]))
    if defaults:
        d_seeds = [int(r["seed"]) for r in defaults]
        rows.append(
            row(
                "product default: fusion + vote + learned hybrid",
                d_seeds,
                [r["test"]["default"] for r in defaults],
            )
        )
        label = "the same models, tuned channel in the hybrid's place"
        rows.append(row(label, d_seeds, [r["test"]["with channel"] for r in defaults]))
    for ablation in ABLATIONS:
        if all(ablation in r["test"] for r in recs):
            rows.append(row(f"encoder + hybrid, {ablation}", seeds, [r["test"][ablation] for r in recs]))
    return rows


def render(report: dict[str, Any]) -> str:
    lines = [
        "# The learned hybrid on the archived encoders",
        "",
        f"`{report['command']}`, {report['date']}, {report['machine']}. Test NDCG@10 and HR@10 over the "
        "whole catalogue, mean ± std over encoder seeds (seeds differ in the whole encoder). *unmasked*: "
        "the paper protocol, items the user has seen compete; *masked*: they are removed. Baselines are "
        "deterministic (one run, `python -m bench.baselines`, reports/baselines.md), ranked by the same "
        "evaluator. *encoder*: the archived encoder alone; *tuned channel*: the transition channel with "
        "its order and λ tuned on validation, as `memrec train` tunes it; *learned hybrid*: model.hybrid "
        "fitted on validation; *default before the hybrid*: `memrec train --stage finetune --vote "
        "--transitions` before the hybrid existed (reports/retrieval.md); *product default*: the same "
        "command today (below); *no gates*, *no history*, *no positions*: the ablations (below).",
        *dataset_tables(report.get("tables", {})),
        "",
        "## All runs",
        "",
        "*baseline*: the strongest parameter-free baseline (transitions alone, order tuned on validation, "
        "popularity tie-break). *gain*: the hybrid's NDCG@10 over the baseline's, per seed; *− encoder*: "
        "the hybrid's NDCG@10 minus the encoder's, per seed, paired on the same encoder.",
        "",
        "| run | protocol | baseline NDCG@10 | encoder NDCG@10 | channel NDCG@10 | hybrid NDCG@10 "
        "| baseline HR@10 | encoder HR@10 | channel HR@10 | hybrid HR@10 | gain per seed "
        "| − encoder per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        for p in PROTOCOLS:
            e = r[p]
            base = e.get("baseline")
            cells = [name, p]
            for m in ("ndcg@10", "hr@10"):
                cells.append(f"{base[m]:.4f}" if base else "–")
                cells += [fmt(e[arm][m]) for arm in ARMS]
            cells.append(", ".join(f"{g:+.1%}" for g in e.get("gain_over_baseline", [])) or "–")
            cells.append(", ".join(f"{d:+.4f}" for d in e["minus_encoder"]))
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per run: seeds, the channel each seed's validation chose (order/λ), and whether validation kept "
        "the hybrid (*gated*: in the form with gates, which beat the form without them).",
        "",
    ]
    lines += ["| run | seeds | channel per seed | hybrid kept per seed |", "|---|---|---|---|"]
    for name, r in report["runs"].items():
        kept = kept_cell(r)
        lines.append(f"| {name} | {', '.join(map(str, r['seeds']))} | {', '.join(r['channels'])} | {kept} |")
    lines += [
        "",
        "Ablations: the hybrid refitted on validation with one of its parts changed. *with gates*: the "
        "weights move with the query features, whether or not validation chose that form; *no gates*: "
        "one weight per source for every query; *no history*: without the seen and last-item features; "
        "*no positions*: the channel's distribution without the per-position shares (these two in the "
        "form validation chose). Test NDCG@10 / HR@10.",
        "",
        "| run | protocol | " + " | ".join(("hybrid", *ABLATIONS)) + " |",
        "|---|---|" + "---|" * (1 + len(ABLATIONS)),
    ]
    for name, r in report["runs"].items():
        for p in PROTOCOLS:
            arms = [a for a in ("hybrid", *ABLATIONS) if a in r[p]]
            if len(arms) == 1:
                continue
            cells = [f"{fmt(r[p][a]['ndcg@10'])} / {fmt(r[p][a]['hr@10'])}" for a in arms]
            lines.append(f"| {name} | {p} | " + " | ".join(cells) + " |")
    lines += default_table(report.get("defaults", {}))
    lines += transition_mix.baseline_table(
        transition_mix.baseline_rows(sorted({n.split(".")[0] for n in report["runs"]}))
    )
    return "\n".join(lines) + "\n"


def dataset_tables(tables: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One table per run (a dataset and its encoder): every row under both protocols, NDCG@10 and HR@10."""
    lines: list[str] = []
    for name, rows in tables.items():
        dataset, encoder = name.split(".", 1)
        lines += [
            "",
            f"## {dataset} ({encoder} encoder)",
            "",
            "| model | seeds | NDCG@10 | HR@10 | masked NDCG@10 | masked HR@10 |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            seeds = ", ".join(map(str, r["seeds"])) or "–"
            cells = [fmt(r[p][m]) for p in PROTOCOLS for m in ("ndcg@10", "hr@10")]
            lines.append(f"| {r['label']} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def default_table(defaults: dict[str, Any]) -> list[str]:
    """The product default's rows: memrec train's model, and the same model with the tuned channel in
    the hybrid's place."""
    if not defaults:
        return []
    lines = [
        "",
        "The product default: `memrec train --stage finetune --from <the archived encoder> --vote "
        "--transitions` (fusion, vote, channel and hybrid, each kept where validation finds a gain), "
        "fine-tuned with the encoder's seed. *with channel*: the same model with its tuned channel in "
        "the hybrid's place; *− channel*: their paired NDCG@10 difference per seed; *gain*: the "
        "default's NDCG@10 over the strongest baseline's, per seed; *yes (gated)*: the hybrid kept with "
        "gates (a model trained before the gates had to beat the form without them always has them).",
        "",
        "| dataset | seeds | protocol | default NDCG@10 | with channel NDCG@10 | default HR@10 "
        "| with channel HR@10 | gain per seed | − channel per seed | hybrid kept per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, r in defaults.items():
        kept = kept_cell(r)
        for p in PROTOCOLS:
            e = r[p]
            cells = [dataset, ", ".join(map(str, r["seeds"])), p]
            cells += [fmt(e[arm][m]) for m in ("ndcg@10", "hr@10") for arm in ("default", "with channel")]
            cells.append(", ".join(f"{g:+.1%}" for g in e.get("gain_over_baseline", [])) or "–")
            cells += [", ".join(f"{d:+.4f}" for d in e["minus_channel"]), kept]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def kept_cell(entry: dict[str, Any]) -> str:
    """Per seed: whether validation kept the hybrid, and in which form (an :func:`aggregate` entry)."""
    return ", ".join(
        ("yes (gated)" if g else "yes") if k else "no"
        for k, g in zip(entry["kept"], entry["gated"], strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hybrid", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["ml-100k.sasrec_allpos"], help="archived encoders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the result files, run nothing"
    )
    parser.add_argument(
        "--defaults", nargs="+", type=Path, default=[], help="model directories memrec train wrote, to record"
    )
    args = parser.parse_args(argv)
    for model_dir in args.defaults:
        rec = default_record(model_dir)
        write_result(DEFAULTS / f"{rec['dataset']}.seed{rec['seed']}.json", rec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    for name in [] if args.report_only else args.runs:
        for seed in args.seeds:
            path = RESULTS / f"{name}.seed{seed}.json"
            if not (ENCODERS / f"{name}.seed{seed}").is_dir():
                log.warning(
                    "%s seed %d: no archived encoder yet (python -m bench.accuracy trains it)", name, seed
                )
                continue
            if not path.is_file() or "with gates" not in json.loads(path.read_text())["test"]:
                rec = run_one(name, seed, args.data_dir)
                write_result(path, rec)  # with the machine and the date
                ndcg = [rec["test"][arm]["unmasked"]["ndcg@10"] for arm in ARMS]
                log.info(
                    "%s seed %d: test NDCG@10 encoder %.4f, channel %.4f, hybrid %.4f", name, seed, *ndcg
                )
    command = shlex.join(["python", "-m", "bench.hybrid", *(argv if argv is not None else sys.argv[1:])])
    report = aggregate(None if args.report_only else command)
    (REPORTS / "hybrid.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (REPORTS / "hybrid.md").write_text(render(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
