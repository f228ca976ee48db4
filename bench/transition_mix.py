"""Transition channel on an archived encoder → ``reports/transition_mix.json`` and ``.md``.

    python -m bench.transition_mix --runs ml-100k.sasrec_allpos beauty.pretrain --seeds 0 1 2

The product's transition channel (``model.transitions``) on the plain encoder, without fusion or vote:
what the channel adds by itself. The memory bank's pairs, read as item transitions, give every query a
distribution over next items; the encoder's softmax is mixed with it, (1 − λ) · p_encoder + λ ·
p_transition, chosen on validation (best NDCG@10, λ = 0 among the candidates; no HR guard or z rule
here, unlike ``memrec train``): λ alone at order 5 (the query's last five items, the channel before
its order was tuned: the ``mixed`` arm), and the order (1 … 5) with λ (``tuned``), as ``memrec train``
now chooses them. Transitions come from the training pairs for validation and also from the validation
pairs for test, as the memory bank holds them; never from a test target. One result file per (run,
seed) in ``reports/transition_mix_runs/``; the report aggregates what exists (``--report-only``:
nothing is computed), with the parameter-free baselines of each run's dataset (``bench.baselines``,
reports/baselines.json) on the same test queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bench import baselines
from bench.accuracy import ENCODERS
from bench.common import REPORTS, fmt, grouped_results, stamp, stat, write_result
from model import artifact
from model import transitions as tr
from model.data import IntArray, Interactions, Samples, leave_one_out, load_dataset
from model.evaluate import mask_seen, metrics_from_ranks, target_ranks

log = logging.getLogger("bench.transition_mix")

RESULTS = REPORTS / "transition_mix_runs"
WEIGHTS = (0.0, *tr.WEIGHTS)  # λ candidates
OFF = f"{tr.MAX_ORDER}/0"  # the encoder alone


def key(order: int, weight: float) -> str:
    return f"{order}/{weight:g}"


@torch.inference_mode()
def mixed_ranks(
    art: artifact.Artifact,
    samples: Samples,
    seen: tuple[IntArray, IntArray],
    rows: Mapping[int, tr.Row],
    batch: int = 512,
) -> dict[str, dict[str, np.ndarray]]:
    """Per "order/λ" and protocol (unmasked, masked): the target's rank of every sample (N,); ``rows``
    are the bank's follower rows (model.transitions.follower_rows)."""
    mixes = [tr.TransitionMix(0.0), *(tr.TransitionMix(w, o) for o in tr.ORDERS for w in WEIGHTS if w)]
    keys = {key(m.order, m.weight): m for m in mixes}  # OFF first
    out = {k: {p: np.zeros(len(samples), np.int64) for p in ("unmasked", "masked")} for k in keys}
    n_ids = art.encoder.cfg.n_items + 1  # ids 1..n_items, 0 = padding
    recent = tr.recent_items(samples.inputs, samples.lengths)
    for start in range(0, len(samples), batch):
        idx = np.arange(start, min(start + batch, len(samples)))
        t = int(samples.lengths[idx].max())
        x, n = torch.from_numpy(samples.inputs[idx, :t]), torch.from_numpy(samples.lengths[idx])
        logits = art.encoder.scores(art.encoder.encode(x, n))  # (B, V), column 0 = -inf
        near = wanted(rows, recent[idx])
        shares = {o: tr.shares_from_rows(recent[idx], near, n_ids, o) for o in tr.ORDERS}
        y = torch.from_numpy(samples.targets[idx])
        for k, m in keys.items():
            s = tr.mix(logits, shares[m.order], m).clone()
            out[k]["unmasked"][idx] = target_ranks(s, y).numpy()
            mask_seen(s, idx, seen)
            out[k]["masked"][idx] = target_ranks(s, y).numpy()
    return out


_NO_FOLLOWERS: tr.Row = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def wanted(rows: Mapping[int, tr.Row], recent: IntArray) -> dict[int, tr.Row]:
    """The follower rows of the items in ``recent``, an empty row where no memory's prefix holds one
    (model.transitions.shares_from_rows reads a row for every item it is given)."""
    return {a: rows.get(a, _NO_FOLLOWERS) for a in np.unique(recent[recent > 0]).tolist()}


def run_one(name: str, seed: int, data_dir: str | None) -> dict[str, Any]:
    dataset = name.split(".")[0]
    art = artifact.load(ENCODERS / f"{name}.seed{seed}")
    data: Interactions = load_dataset(dataset, data_dir).with_vocab(art.vocab)  # the encoder's ids
    split = leave_one_out(data, art.encoder.cfg.max_len)
    per_split = {}
    # The memory bank's pairs: the training pairs for validation, with the validation pairs for test.
    pairs = {"valid": [split.train], "test": [split.train, split.valid]}
    for which, samples, seen in (
        ("valid", split.valid, split.valid_seen),
        ("test", split.test, split.test_seen),
    ):
        items = np.concatenate([p.targets for p in pairs[which]])
        recent = np.concatenate([tr.recent_items(p.inputs, p.lengths) for p in pairs[which]])
        ranks = mixed_ranks(art, samples, seen, tr.follower_rows(items, recent))
        per_split[which] = {k: {p: metrics_from_ranks(r) for p, r in d.items()} for k, d in ranks.items()}

    def best(keys: list[str]) -> str:  # the first of the best by validation NDCG@10
        return max(keys, key=lambda k: (per_split["valid"][k]["unmasked"]["ndcg@10"], -keys.index(k)))

    at_five = best([OFF, *(key(tr.MAX_ORDER, w) for w in WEIGHTS if w)])
    tuned = best(list(per_split["valid"]))
    return {
        "run": name,
        "seed": seed,
        "weight": float(at_five.split("/")[1]),
        "tuned_order": int(tuned.split("/")[0]) if tuned != OFF else None,
        "tuned_weight": float(tuned.split("/")[1]),
        "encoder": per_split["test"][OFF],
        "mixed": per_split["test"][at_five],
        "tuned": per_split["test"][tuned],
        "valid_ndcg@10": {k: r["unmasked"]["ndcg@10"] for k, r in per_split["valid"].items()},
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Transition channel on the plain archived encoders",
        "",
        f"`{report['command']}`, {report['date']}, {report['machine']}. Test NDCG@10 and HR@10, "
        "mean ± std over seeds, chosen per seed on validation NDCG@10 (unmasked). The product's channel "
        "(model.transitions) on the encoder alone, without fusion or vote: what it adds by itself; "
        "*order 5*: λ alone tuned, over the query's last five items; *tuned*: the order (1 … 5) and λ "
        "tuned, as `memrec train` chooses them.",
        "",
        "| run | seeds | λ per seed (order 5) | order/λ per seed (tuned) | protocol | encoder NDCG@10 "
        "| order 5 NDCG@10 | tuned NDCG@10 | encoder HR@10 | order 5 HR@10 | tuned HR@10 |",
        "|---|---:|---|---|---|---|---|---|---|---|---|",
    ]
    arms = ("encoder", "mixed", "tuned")
    for name, r in report["runs"].items():
        for p in ("unmasked", "masked"):
            cells = [str(r["seeds"]), ", ".join(f"{w:g}" for w in r["weights"]), ", ".join(r["tuned"]), p]
            cells += [fmt(r[p][arm][m]) for m in ("ndcg@10", "hr@10") for arm in arms]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, *baseline_table(report.get("baselines", {}))]) + "\n"


def baseline_table(by_dataset: dict[str, Any]) -> list[str]:
    """The parameter-free baselines of the runs' datasets: ties against the target (as the encoder and
    the mix are ranked), then the popularity tie-break."""
    if not by_dataset:
        return []
    lines = ["", *baselines.NOTE, "", "| dataset | baseline | protocol | NDCG@10 | HR@10 |"]
    lines.append("|---|---|---|---|---|")
    for dataset, rows in by_dataset.items():
        for row in rows.values():
            for p in ("unmasked", "masked"):
                cells = [dataset, row["label"], p, f"{row[p]['ndcg@10']:.4f}", f"{row[p]['hr@10']:.4f}"]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def baseline_rows(datasets: list[str], measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """{dataset: {baseline: its label, tie rule and test NDCG@10 and HR@10 per protocol}} for the
    datasets bench.baselines measured (``measured``: its report, read from reports/ when None), ties
    against first."""
    measured = baselines.load(REPORTS / "baselines.json") if measured is None else measured
    out: dict[str, Any] = {}
    for dataset in datasets:
        if dataset not in measured:
            continue
        entries = baselines.entries(measured[dataset])
        keys = sorted(entries, key=lambda k: entries[k]["tie_rule"] != "ties_against")  # stable
        out[dataset] = {
            k: {
                "label": entries[k]["label"],
                "tie_rule": entries[k]["tie_rule"],
                **{
                    p: {m: entries[k]["test"][p][m]["mean"] for m in ("ndcg@10", "hr@10")}
                    for p in ("unmasked", "masked")
                },
            }
            for k in keys
        }
    return out


def aggregate(command: str | None = None) -> dict[str, Any]:
    """The result files → the report; the machine(s) and the date are the runs' (the latest), the
    command ``command`` or, when None, one that reproduces the files (they are skipped when present)."""
    runs = grouped_results(RESULTS, lambda r: str(r["run"]))
    recs_all = [r for recs in runs.values() for r in recs]
    if command is None:
        seeds = sorted({int(r["seed"]) for r in recs_all})
        args = ["--runs", *runs, "--seeds", *map(str, seeds)] if runs else []
        command = shlex.join(["python", "-m", "bench.transition_mix", *args])
    out: dict[str, Any] = {}
    for name, recs in runs.items():
        recs = [r for r in recs if "tuned" in r]  # files from before the order was tuned are rerun
        if not recs:
            continue
        out[name] = {"seeds": len(recs), "weights": [r["weight"] for r in recs]}
        out[name]["tuned"] = [f"{r['tuned_order'] or '-'}/{r['tuned_weight']:g}" for r in recs]
        for p in ("unmasked", "masked"):
            out[name][p] = {
                arm: {m: stat([r[arm][p][m] for r in recs]) for m in ("ndcg@10", "hr@10")}
                for arm in ("encoder", "mixed", "tuned")
            }
    when, machines = stamp(recs_all)
    return {
        "command": command,
        "date": when,
        "machine": machines,
        "runs": out,
        "baselines": baseline_rows(sorted({name.split(".")[0] for name in runs})),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transition_mix", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", nargs="+", default=["ml-100k.sasrec_allpos"], help="archived encoders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the result files, run nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    for name in [] if args.report_only else args.runs:
        for seed in args.seeds:
            path = RESULTS / f"{name}.seed{seed}.json"
            if not path.is_file() or "tuned" not in json.loads(path.read_text(encoding="utf-8")):
                rec = run_one(name, seed, args.data_dir)
                write_result(path, rec)  # with the machine and the date
                ndcg = [rec[arm]["unmasked"]["ndcg@10"] for arm in ("encoder", "mixed", "tuned")]
                log.info(
                    "%s seed %d: order 5 λ %g, tuned order %s λ %g; test NDCG@10 %.4f → %.4f → %.4f",
                    *(name, seed, rec["weight"], rec["tuned_order"], rec["tuned_weight"], *ndcg),
                )
    command = shlex.join(
        ["python", "-m", "bench.transition_mix", *(argv if argv is not None else sys.argv[1:])]
    )
    report = aggregate(None if args.report_only else command)
    (REPORTS / "transition_mix.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (REPORTS / "transition_mix.md").write_text(render(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
