"""Parameter-free baselines → ``reports/baselines.json`` and ``.md``.

    python -m bench.baselines --datasets ml-100k beauty sports toys lastfm yelp --threads 1

Three rankings that learn nothing, scored by the project's own evaluator (model.evaluate.evaluate:
full ranking, unmasked and masked, pessimistic ties, head/tail split) on the test samples of the
leave-one-out split, from the pairs the model's test-time memory bank holds: the training and the
validation pairs (model.finetune.evaluate_on_test), never a test target.

* ``popularity``: an item's score is how often it is the target of those pairs.
* ``last_item_markov``: how often the item followed the query's last item right away (lag 1), over
  those pairs' prefixes (model.transitions.follower_rows, read at order 1).
* ``transitions_alone``: the transition channel's share with no encoder (model.transitions.
  shares_from_rows over the query's last 5 items, lag weights 1/k as in the product).
* ``transitions_tuned``: the same at the order (the query's last 1 … 5 items) that scores best on the
  validation queries (NDCG@10 unmasked, the same tie rule; counts from the training pairs alone), as
  ``memrec train`` now tunes the product's channel: the baseline gets the same tuning the model does.

Each under two tie rules: ``ties_against`` (the evaluator's: items scoring the same as the target rank
ahead of it) and ``popularity_tiebreak`` (equal scores ordered by popularity, as score + popularity /
(max popularity + 1): the scores are integers, so the fraction orders ties and never distinct scores;
it is applied as an exact (score, popularity) order, without floating-point rounding). Popularity under
its own tie-break is the same ranking, so it has one row. Deterministic: one run, no seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.common import GROUPS, METRICS, PROTOCOLS, REPORTS, machine, machine_label, stat
from model import transitions as tr
from model.data import IntArray, Samples, Split, leave_one_out, load_dataset
from model.evaluate import Metrics, evaluate, head_items

log = logging.getLogger("bench.baselines")

JSON = REPORTS / "baselines.json"
DATASETS = ("ml-100k", "beauty", "sports", "toys", "lastfm", "yelp")
BASELINES = ("popularity", "last_item_markov", "transitions_alone", "transitions_tuned")
TIE_RULES = ("ties_against", "popularity_tiebreak")
LABELS = {
    "popularity": "popularity",
    "last_item_markov": "last-item Markov",
    "transitions_alone": "transitions alone (no encoder)",
    "transitions_tuned": "transitions alone, order tuned on validation",
}
TIE_LABELS = {"ties_against": "ties against", "popularity_tiebreak": "popularity tie-break"}


@dataclass(frozen=True)
class Counts:
    """What the test-time memory bank holds, as the baselines read it."""

    popularity: IntArray  # (n_ids,) how often each id is a pair's target (0 for the padding id)
    rows: dict[int, tr.Row]  # every item's follower rows over the pairs' last MAX_ORDER items

    @classmethod
    def from_pairs(cls, pairs: list[Samples], n_ids: int) -> Counts:
        items = np.concatenate([p.targets for p in pairs])
        recent = np.concatenate([tr.recent_items(p.inputs, p.lengths) for p in pairs])
        popularity = np.bincount(items, minlength=n_ids).astype(np.int64)
        return cls(popularity, tr.follower_rows(items, recent, tr.MAX_ORDER))


def bank_counts(split: Split, n_ids: int) -> Counts:
    """The counts of the bank the model is tested with: training + validation pairs."""
    return Counts.from_pairs([split.train, split.valid], n_ids)


_NO_FOLLOWERS: tr.Row = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))


def shares(recent: IntArray, counts: Counts, n_ids: int, order: int) -> np.ndarray:
    """(B, n_ids) float64 transition shares (exact integers) of queries whose last items are ``recent``
    (B, MAX_ORDER), at ``order`` (1: the last item at lag 1 only; MAX_ORDER: the product's channel)."""
    wanted = {a: counts.rows.get(a, _NO_FOLLOWERS) for a in np.unique(recent[recent > 0]).tolist()}
    dense: np.ndarray = tr.shares_from_rows(recent, wanted, n_ids, order).dense(n_ids).numpy()
    return dense


def primary_scores(
    baseline: str, recent: IntArray, counts: Counts, n_ids: int, order: int = tr.MAX_ORDER
) -> np.ndarray:
    """(B, n_ids) float64 integer-valued scores of a baseline; ``order``: transitions_tuned's."""
    if baseline == "popularity":
        return np.broadcast_to(counts.popularity.astype(np.float64), (len(recent), n_ids))
    if baseline == "last_item_markov":
        return shares(recent, counts, n_ids, order=1)
    if baseline == "transitions_alone":
        return shares(recent, counts, n_ids, order=tr.MAX_ORDER)
    if baseline == "transitions_tuned":
        return shares(recent, counts, n_ids, order=order)
    raise ValueError(f"unknown baseline {baseline!r}")


def ordinal_scores(primary: np.ndarray, secondary: np.ndarray | None) -> Tensor:
    """Scores (B, n_ids) float32 that order every row as (``primary``, then ``secondary``) does, equal
    pairs equal: each item's dense rank in its row (exact in float32), the padding column −inf. The
    evaluator ranks in float32, where large integer shares plus a tie-break fraction would round."""
    n_rows, n_ids = primary.shape
    keys = (
        np.zeros_like(primary) if secondary is None else np.broadcast_to(secondary, primary.shape),
        primary,
    )
    order = np.lexsort(keys, axis=-1)  # ascending by primary, then secondary
    p = np.take_along_axis(primary, order, axis=1)
    s = np.take_along_axis(keys[0], order, axis=1)
    new = np.ones((n_rows, n_ids), bool)
    new[:, 1:] = (p[:, 1:] != p[:, :-1]) | (s[:, 1:] != s[:, :-1])
    dense = np.empty((n_rows, n_ids), np.float32)
    np.put_along_axis(dense, order, np.cumsum(new, axis=1).astype(np.float32), axis=1)
    out = torch.from_numpy(dense)
    out[:, 0] = -torch.inf
    return out


def score_fn(
    baseline: str, tie_rule: str, samples: Samples, counts: Counts, n_ids: int, order: int = tr.MAX_ORDER
) -> Callable[[Tensor, Tensor, IntArray], Tensor]:
    """A model.evaluate score function for a baseline under a tie rule."""
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}")
    recent = tr.recent_items(samples.inputs, samples.lengths)
    tiebreak = counts.popularity.astype(np.float64)

    def fn(_x: Tensor, _lengths: Tensor, idx: IntArray) -> Tensor:
        primary = primary_scores(baseline, recent[idx], counts, n_ids, order)
        return ordinal_scores(primary, tiebreak if tie_rule == "popularity_tiebreak" else None)

    return fn


def evaluate_baseline(
    baseline: str,
    tie_rule: str,
    samples: Samples,
    seen: tuple[IntArray, IntArray],
    counts: Counts,
    n_ids: int,
    head: np.ndarray | None = None,
    order: int = tr.MAX_ORDER,
) -> Metrics:
    """Full-ranking metrics of a baseline (model.evaluate.evaluate)."""
    fn = score_fn(baseline, tie_rule, samples, counts, n_ids, order)
    return evaluate(fn, samples, seen, batch_size=512, head=head)


def tuned_order(split: Split, tie_rule: str, n_ids: int) -> int:
    """The order of transitions_tuned: the best validation NDCG@10 (unmasked) under ``tie_rule``,
    counting the training pairs alone (the validation queries' own targets are not among them); ties
    go to the lower order."""
    counts = Counts.from_pairs([split.train], n_ids)
    valid, seen = split.valid, split.valid_seen
    scored = {
        o: evaluate_baseline("transitions_tuned", tie_rule, valid, seen, counts, n_ids, order=o)
        for o in tr.ORDERS
    }
    return max(tr.ORDERS, key=lambda o: (scored[o]["unmasked"]["ndcg@10"], -o))


def variants() -> list[tuple[str, str]]:
    """(baseline, tie rule) pairs measured: popularity under its own tie-break is the same ranking."""
    return [(b, t) for b in BASELINES for t in TIE_RULES if (b, t) != ("popularity", "popularity_tiebreak")]


def run_dataset(dataset: str, data_dir: str | None) -> dict[str, Any]:
    data = load_dataset(dataset, data_dir)
    split = leave_one_out(data, max_len=50)
    n_ids = data.vocab.n_items + 1
    counts = bank_counts(split, n_ids)
    head = head_items(split.train.targets, data.vocab.n_items)
    results: dict[str, dict[str, Metrics]] = {}
    orders = {t: tuned_order(split, t, n_ids) for t in TIE_RULES}
    for baseline, tie_rule in variants():
        order = orders[tie_rule] if baseline == "transitions_tuned" else tr.MAX_ORDER
        m = evaluate_baseline(baseline, tie_rule, split.test, split.test_seen, counts, n_ids, head, order)
        results.setdefault(baseline, {})[tie_rule] = m
        log.info(
            "%s %s, %s: NDCG@10 %.4f unmasked, %.4f masked",
            dataset,
            baseline,
            tie_rule,
            m["unmasked"]["ndcg@10"],
            m["masked"]["ndcg@10"],
        )
    return {
        "users": data.n_users,
        "items": data.vocab.n_items,
        "test_queries": len(split.test),
        "bank_pairs": len(split.train) + len(split.valid),
        "seed": None,  # deterministic: nothing is drawn
        "tuned_orders": orders,  # transitions_tuned's order per tie rule
        "baselines": results,
    }


# ----------------------------------------------------------------------------------------------------
# Reading the report: rows for the other benchmarks' tables


def load(path: Path = JSON) -> dict[str, Any]:
    """reports/baselines.json's datasets, {dataset: record} ({} when the file does not exist)."""
    if not path.is_file():
        return {}
    datasets: dict[str, Any] = json.loads(path.read_text())["datasets"]
    return datasets


def row_label(baseline: str, tie_rule: str) -> str:
    """A table row's name: the evaluator's tie rule is the main row, the tie-break is said."""
    label = LABELS[baseline]
    return label if tie_rule == "ties_against" else f"{label}, {TIE_LABELS[tie_rule]}"


def entries(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A dataset's baselines in the shape of bench.common.aggregate's entries (no seeds: one
    deterministic run), keyed ``<baseline>`` (ties against) and ``<baseline>_popularity_tiebreak``."""
    out: dict[str, dict[str, Any]] = {}
    for baseline, by_tie in record["baselines"].items():
        for tie_rule, m in by_tie.items():
            key = baseline if tie_rule == "ties_against" else f"{baseline}_{tie_rule}"
            out[key] = {
                "baseline": baseline,
                "tie_rule": tie_rule,
                "label": row_label(baseline, tie_rule),
                "seeds": [],
                "test": {p: {k: stat([m[p][k]]) for k in METRICS} for p in (*PROTOCOLS, *GROUPS) if p in m},
                "machines": [machine_label(record["machine"])],
                "commands": [record["command"]],
                "dates": [record["date"]],
            }
    return out


NOTE = [
    "Parameter-free baselines (`python -m bench.baselines`, reports/baselines.md): counts over the",
    "training + validation pairs the model's test-time memory bank holds, ranked by the same evaluator;",
    "deterministic, one run. Main rows: ties against the target, as for the models; *popularity",
    "tie-break*: equal scores ordered by popularity.",
]


# ----------------------------------------------------------------------------------------------------
# The report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Parameter-free baselines",
        "",
        "Generated by `python -m bench.baselines`; each dataset's command, machine and date are under its",
        "table. Nothing is trained and nothing is drawn, so every figure is one deterministic run (no seed).",
        "",
        "Protocol: chronological leave-one-out, test samples (the last item of every user), full ranking",
        "over all items by model.evaluate (the models' evaluator). *unmasked* = paper protocol (seen items",
        "compete); *masked* = items seen before the target removed. Counts come from the training +",
        "validation pairs, as the model's test-time memory bank holds them; never from a test target.",
        "",
        "- **popularity**: how often the item is the target of those pairs.",
        "- **last-item Markov**: how often the item came right after (lag 1) the query's last item.",
        "- **transitions alone (no encoder)**: the product's transition share (model.transitions) over the",
        "  query's last 5 items at lags 1–5, weights 1/j · 1/k, without an encoder.",
        "- **transitions alone, order tuned on validation**: the same over the query's last 1 … 5 items,",
        "  the order with the best validation NDCG@10 (counts from the training pairs), as `memrec train`",
        "  tunes the product's channel. The order chosen is under each table.",
        "",
        "Tie rules: *ties against* = the evaluator's rule, every item scoring the same as the target ranks",
        "ahead of it (items without any count all tie); *popularity tie-break* = equal scores ordered by",
        "popularity (score + popularity / (max popularity + 1), applied exactly: it orders ties and never",
        "distinct scores). Popularity under its own tie-break is the same ranking. The head split: targets",
        "among the 20 % most frequent training targets.",
        "",
    ]
    for dataset, r in report["datasets"].items():
        lines += [
            f"## {dataset}",
            "",
            f"{r['users']} users, {r['items']} items, {r['test_queries']} test queries, "
            f"{r['bank_pairs']} training + validation pairs.",
            "",
            "| baseline | tie rule | NDCG@10 unmasked | HR@10 unmasked | NDCG@10 masked | HR@10 masked "
            "| NDCG@10 head | NDCG@10 tail |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for baseline, by_tie in r["baselines"].items():
            for tie_rule, m in by_tie.items():
                cells = [LABELS[baseline], TIE_LABELS[tie_rule]]
                cells += [f"{m[p][k]:.4f}" for p in PROTOCOLS for k in ("ndcg@10", "hr@10")]
                cells += [f"{m[g]['ndcg@10']:.4f}" for g in ("unmasked_head", "unmasked_tail")]
                lines.append("| " + " | ".join(cells) + " |")
        if "tuned_orders" in r:
            chosen = ", ".join(f"{TIE_LABELS[t]} {o}" for t, o in r["tuned_orders"].items())
            lines += ["", f"Order of *transitions alone, order tuned on validation*: {chosen}."]
        lines += ["", f"`{r['command']}`, {r['date']}, {machine_label(r['machine'])}.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any]) -> None:
    JSON.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (REPORTS / "baselines.md").write_text(markdown(report), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"datasets": load()}
    if not args.report_only:
        for dataset in args.datasets:
            command = shlex.join(
                ["python", "-m", "bench.baselines", "--datasets", dataset, "--threads", str(args.threads)]
            )
            record = {"machine": machine(), "command": command, **run_dataset(dataset, args.data_dir)}
            report["datasets"][dataset] = {**record, "date": datetime.now(UTC).isoformat(timespec="seconds")}
            report["datasets"] = {d: report["datasets"][d] for d in sorted(report["datasets"], key=_order)}
            write_report(report)  # after each dataset
    write_report(report)
    return 0


def _order(dataset: str) -> tuple[int, str]:
    return (DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS), dataset)


if __name__ == "__main__":
    sys.exit(main())
