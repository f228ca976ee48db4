"""Retrieval ablation: each fusion variant fine-tuned on the same frozen encoder, several seeds.

    python -m bench.retrieval --datasets ml-100k beauty --seeds 0 1 2 --encoder pretrain

For every (dataset, seed) the encoder is the accuracy benchmark's model directory of that seed (trained
through `bench.accuracy` first if missing); each variant runs `memrec train --stage finetune --from
ENCODER` (the random control `python -m bench.controls train`, with the same flags) into
`runs/retrieval/`, its retrieval cost is measured on the model directory (`bench.retrieval_cost`), and
it leaves one result file in `reports/retrieval_runs/`.
`reports/retrieval.{json,md}` aggregate whatever result files exist; `pretrain_only` is the encoder's
own test result, so every row of a dataset shares one encoder per seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import accuracy, baselines, learned_retriever, retrieval_cost
from bench.common import (
    CLI,
    GROUPS,
    REPORTS,
    RUNS,
    aggregate,
    cost_table,
    display_path,
    evaluate_cli,
    fmt,
    machine,
    metric_table,
    run_recorded,
    write_result,
)
from model.artifact import ArtifactError
from model.data import DataError

log = logging.getLogger("bench.retrieval")

RESULTS = REPORTS / "retrieval_runs"

# the memory vote's default grid (model.vote.VoteGrid) plus τ 0.2 and 200 voters
WIDE_VOTE_GRID = ["--vote-temperatures", "0.02", "0.05", "0.1", "0.2"]
WIDE_VOTE_GRID += ["--vote-depths", "20", "50", "100", "200"]

# variant → extra `memrec train --stage finetune` flags. raserec_k20 is the published module (α = 0.5,
# β = 1, K = 20); the others change one thing each so that each effect is measured on its own.
VARIANTS: dict[str, list[str]] = {
    "raserec_k20": [],
    "residual_norm": ["--residual-norm"],
    "gate": ["--gate"],
    "similarity_bias": ["--similarity-bias"],
    "alpha_03": ["--alpha", "0.3"],  # the published mix with more weight on the retrieved memories
    "alpha_07": ["--alpha", "0.7"],  # … and with less
    "adaptive_k": ["--adaptive-k"],
    "cross_user": ["--cross-user"],
    "user_memories": ["--user-memories"],
    "user_memories_fewest": ["--user-memories", "--memory-quality", "fewest_accesses"],
    # memories drawn at random (the leakage rule applied): the control that shows similarity matters;
    # trained by bench.controls with memrec train's flags (CONTROLS)
    "random_retrieval": [],
    # the published module plus the memory vote (model.vote), its weight, temperature and depth
    # chosen on validation (off among the candidates)
    "vote": ["--vote"],
    # the vote on the encoder alone: α = 1 makes the fused state h itself (one epoch, nothing to learn)
    "vote_only": ["--alpha", "1.0", "--ft-epochs", "1", "--vote"],
    # … chosen from a wider grid: softer (τ 0.2) and deeper (200 voters) neighbourhoods too
    "vote_only_wide": ["--alpha", "1.0", "--ft-epochs", "1", "--vote", *WIDE_VOTE_GRID],
    # the transition channel (model.transitions) on top of the vote variant: the product's default
    "transitions": ["--vote", "--transitions"],
    # the channel on the encoder alone (α = 1, one epoch, as vote_only)
    "transitions_only": ["--alpha", "1.0", "--ft-epochs", "1", "--transitions"],
}


# variant → the module that trains it instead of `memrec train`: a benchmark control (bench.controls)
CONTROLS: dict[str, str] = {"random_retrieval": "bench.controls"}


def pretrain_only(dataset: str, seed: int, args: argparse.Namespace) -> bool:
    """The encoder's own result: the accuracy benchmark's run (trained there if missing), with test
    metrics from `memrec evaluate` so that they carry the head/tail split too."""
    result_file = RESULTS / f"{dataset}.{args.encoder}.pretrain_only.seed{seed}.json"
    if result_file.is_file():
        return True
    if not accuracy.run_one(dataset, args.encoder, seed, args):
        return False
    encoder_dir = accuracy.encoder_dir(dataset, args.encoder, seed)
    test = evaluate_cli(encoder_dir, device=args.device, data_dir=args.data_dir)
    if test is None:
        return False
    record = json.loads((accuracy.RESULTS / f"{dataset}.{args.encoder}.seed{seed}.json").read_text())
    # "machine" stays the training machine, whose s/epoch and peak RSS these are.
    record = {k: v for k, v in record.items() if k != "date"}
    record["evaluation_machine"] = machine()
    record["test"] = {k: v for k, v in test.items() if k.startswith(("unmasked", "masked"))}
    write_result(result_file, {**record, "variant": "pretrain_only", "encoder": args.encoder})
    return True


def variant_flags(variant: str) -> list[str]:
    """The variant's flags; a variant without the vote or the transition channel says so (`memrec
    train` tunes both by default)."""
    flags = VARIANTS[variant]
    flags = flags if "--vote" in flags else [*flags, "--no-vote"]
    return flags if "--transitions" in flags else [*flags, "--no-transitions"]


def run_one(dataset: str, variant: str, seed: int, args: argparse.Namespace) -> bool:
    encoder_dir = accuracy.trained_encoder(dataset, args.encoder, seed)
    if encoder_dir is None:
        return False
    out = RUNS / "retrieval" / dataset / f"{args.encoder}-{variant}-seed{seed}"
    cli_args = ["--dataset", dataset, "--stage", "finetune", "--from", str(encoder_dir), "--out", str(out)]
    cli_args += ["--seed", str(seed), *variant_flags(variant)]
    record = {"dataset": dataset, "variant": variant, "seed": seed, "encoder": args.encoder}
    record["flags"] = VARIANTS[variant]
    result_file = RESULTS / f"{dataset}.{args.encoder}.{variant}.seed{seed}.json"
    extra = ("memories", "vote", "transitions")
    module = CONTROLS.get(variant, CLI)
    return run_recorded(
        result_file,
        cli_args,
        args,
        record,
        extra,
        module,
        measure=lambda: cost_of(out, dataset, args.data_dir),
    )


def cost_of(model_dir: Path, dataset: str, data_dir: str | None) -> dict[str, Any]:
    """``{"cost": …}``: the retrieval cost of a trained variant (bench.retrieval_cost); nothing, the
    failure logged, when it cannot be measured (the variant's metrics are recorded all the same)."""
    try:
        return {"cost": retrieval_cost.measure_dir(model_dir, dataset, data_dir)}
    except (ArtifactError, DataError, ValueError) as e:
        log.error("retrieval cost of %s not measured: %s", display_path(model_dir), e)
        return {}


def variant_command(variant: str) -> str:
    """How the report names a variant's training: its flags, or the control that trains it."""
    flags = " ".join(VARIANTS[variant])
    control = CONTROLS.get(variant)
    if control is None:
        return f"`{flags or '(none)'}`"
    return f"`{' '.join(['python -m', control, 'train', flags]).strip()}` (memories drawn at random)"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Retrieval ablation",
        "",
        f"Generated {datetime.now(UTC).date().isoformat()} by `python -m bench.retrieval` from the per-seed",
        "files in `reports/retrieval_runs/` (each holds its exact command, machine, seed and date). Every",
        "variant of a dataset is fine-tuned on the same frozen encoder per seed; `pretrain_only` is that",
        "encoder alone. Fine-tuning stops on validation HR@10 (unmasked), patience 10. In",
        "`reports/retrieval.json` each dataset's ablation encoder keys its section by the dataset alone",
        "(" + ", ".join(f"`{d}`: {e}" for d, e in accuracy.ABLATION_ENCODER.items()) + "); other",
        "encoders' sections are `<dataset>, <encoder> encoder`.",
        "",
        *accuracy.PROTOCOL_NOTE,
        "",
        "Variants (`memrec train --stage finetune` flags on top of the published module, RaSeRec's α = 0.5,",
        "β = 1, K = 20; every variant without `--vote` runs with `--no-vote`, without `--transitions` "
        "with `--no-transitions`): " + "; ".join(f"{n} {variant_command(n)}" for n in VARIANTS) + ".",
        "",
        "learned_retriever: the learned retriever over long-term memory",
        "(`python -m bench.learned_retriever`, reports/learned_retriever.md) on the same encoder, on the",
        "whole test set: the queries without long-term memory score from the encoder alone. Nothing is",
        "fine-tuned, so it has no row in the training-cost table.",
        "",
        *baselines.NOTE,
        "",
    ]
    for dataset, by_name in report.items():
        variants = ordered(by_name)
        rows = [
            (v.get("label", name), len(v["seeds"]), p, v["test"][p])
            for name, v in variants.items()
            for p in ("unmasked", "masked")
        ]
        published = accuracy.PUBLISHED.get(dataset.split(",")[0], {}).items()
        rows += [(f"published {n}", 0, "unmasked", pub) for n, pub in published]
        lines += [f"## {heading(dataset, by_name)}", "", *metric_table(rows), "", *cost_table(variants), ""]
        lines += vote_table(variants)
        lines += transitions_table(variants)
        lines += long_tail_table(variants)
        lines += retrieval_cost_table(variants)
    return "\n".join(lines)


def ordered(by_name: dict[str, Any]) -> dict[str, Any]:
    """The encoder alone first, then the variants in ablation order."""
    order = ["pretrain_only", *VARIANTS, "learned_retriever"]
    return {
        n: by_name[n] for n in sorted(by_name, key=lambda n: order.index(n) if n in order else len(order))
    }


def retrieval_cost_table(variants: dict[str, Any]) -> list[str]:
    """Bank build time and size, and encoder / search / fusion time per 1,000 test queries."""
    rows = [(n, v["cost"]) for n, v in variants.items() if "cost" in v]
    if not rows:
        return []
    lines = [
        "Retrieval cost (median over seeds; the test-time bank of training + validation memories; per",
        "1,000 test queries, one CPU thread, the full-catalogue ranking every model pays left out):",
        "",
        "| variant | memories | bank build s | bank MB | encode ms / 1k | search ms / 1k | fusion ms / 1k |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in rows:
        cells = [f"{c['bank_memories']:.0f}", f"{c['bank_build_seconds']:.1f}", f"{c['bank_mb']:.1f}"]
        cells += [f"{c[k]:.1f}" for k in ("encode_ms_per_1k", "retrieve_ms_per_1k", "fuse_ms_per_1k")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return [*lines, ""]


def vote_table(variants: dict[str, Any]) -> list[str]:
    """The memory vote each seed's validation chose (weight 0: it stayed off)."""
    rows = [(n, v) for n, v in variants.items() if v.get("vote")]
    if not rows:
        return []
    lines = [
        "Memory vote chosen on validation (best NDCG@10 with HR@10 no lower than without the vote;",
        "weight λ, temperature τ, voters; λ = 0: off), and its paired effect on test (unmasked): the same",
        "model with the vote switched off, on the same test queries. *valid z*: the validation winner's",
        "NDCG@10 gain over off in standard errors; below `--vote-min-z` (2) it is refused and the vote",
        "stays off (– : recorded before that rule, or no vote beat off):",
        "",
        "| variant | seed | λ | τ | voters | valid z | NDCG@10 off → on | HR@10 off → on |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name, v in rows:
        for c in v["vote"]:
            cells = [str(c["seed"]), f"{c['weight']:g}", f"{c['temperature']:g}", str(c["depth"]), _z_cell(c)]
            for m in ("ndcg@10", "hr@10"):
                cells.append(f"{c[m + '_off']:.4f} → {c[m + '_on']:.4f}" if m + "_off" in c else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def transitions_table(variants: dict[str, Any]) -> list[str]:
    """The transition channel's λ each seed's validation chose (0: it stayed off)."""
    rows = [(n, v) for n, v in variants.items() if v.get("transitions")]
    if not rows:
        return []
    lines = [
        "Transition channel chosen on validation (model.transitions.tune: the best NDCG@10 among the λ",
        "whose HR@10 is no lower than without the channel and whose paired gain is at least 2 standard",
        "errors; *refused*: the validation winner, when it was not significant), and its paired effect on",
        "test (unmasked): the same model without the channel, on the same test queries:",
        "",
        "| variant | seed | λ | valid z | NDCG@10 off → on | HR@10 off → on |",
        "|---|---:|---:|---|---|---|",
    ]
    for name, v in rows:
        for c in v["transitions"]:
            z = "∞" if c["z"] is None else f"{c['z']:.1f}"
            if "refused" in c:
                z += f", refused λ {c['refused']:g}"
            cells = [str(c["seed"]), f"{c['weight']:g}", z]
            cells += [f"{c[m + '_off']:.4f} → {c[m + '_on']:.4f}" for m in ("ndcg@10", "hr@10")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _z_cell(c: dict[str, Any]) -> str:
    if "z" not in c or (c["z"] == 0 and "refused" not in c):
        return "–"
    z = "∞" if c["z"] is None else f"{c['z']:.1f}"
    r = c.get("refused")
    return z if r is None else f"{z}, refused λ {r['weight']:g} τ {r['temperature']:g} {r['depth']} voters"


def long_tail_table(variants: dict[str, Any]) -> list[str]:
    """NDCG@10 on targets among the 20 % most frequent training targets (head) and on the rest."""
    rows = [(n, v) for n, v in variants.items() if "unmasked_head" in v["test"]]
    if not rows:
        return []
    lines = [
        "Long tail: NDCG@10 by target popularity (head = the 20 % most frequent training targets).",
        "",
        "| variant | head, unmasked | tail, unmasked | head, masked | tail, masked |",
        "|---|---|---|---|---|",
    ]
    for name, v in rows:
        cells = [fmt(v["test"][g]["ndcg@10"]) for g in GROUPS]
        lines.append(f"| {v.get('label', name)} | {' | '.join(cells)} |")
    return [*lines, ""]


def long_tail_plot(report: dict[str, Any]) -> None:
    """reports/retrieval_long_tail.png: head vs tail NDCG@10 (unmasked) per variant and dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # an optional extra: `pip install -e '.[bench]'`
        log.warning("matplotlib not installed; skipping the long-tail chart")
        return
    datasets = [d for d, vs in report.items() if any("unmasked_head" in v["test"] for v in vs.values())]
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        names = [n for n, v in ordered(report[dataset]).items() if "unmasked_head" in v["test"]]
        x = np.arange(len(names))
        for offset, group in ((-0.2, "unmasked_head"), (0.2, "unmasked_tail")):
            means = [report[dataset][n]["test"][group]["ndcg@10"]["mean"] for n in names]
            stds = [report[dataset][n]["test"][group]["ndcg@10"]["std"] for n in names]
            ax.bar(x + offset, means, 0.4, yerr=stds, label=group.split("_")[1])
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(f"{heading(dataset, report[dataset])}: test NDCG@10 by target popularity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(REPORTS / "retrieval_long_tail.png", dpi=100)
    plt.close(fig)


def section(dataset: str, encoder: str) -> str:
    """A report key: the dataset alone for the encoder its ablation is built on
    (``accuracy.ABLATION_ENCODER``, as ``reports/accuracy.json`` is keyed), "<dataset>, <encoder>
    encoder" for any other encoder's runs."""
    return dataset if accuracy.ABLATION_ENCODER.get(dataset) == encoder else f"{dataset}, {encoder} encoder"


def heading(key: str, by_name: dict[str, Any]) -> str:
    """A section's title, which always names its encoder."""
    encoder = next(v["encoder"] for v in by_name.values() if "encoder" in v)
    return f"{key.split(',')[0]}, {encoder} encoder"


def write_report() -> dict[str, Any]:
    report = aggregate(RESULTS, section=lambda r: section(r["dataset"], r["encoder"]))
    # the learned retriever, where bench.learned_retriever ran on a section's encoder
    for (dataset, encoder), entry in learned_retriever.ablation_entries().items():
        key = section(dataset, encoder)
        if key in report:
            report[key]["learned_retriever"] = entry
    # the parameter-free baselines of each section's dataset (bench.baselines), after the models
    measured = baselines.load(REPORTS / "baselines.json")
    for key, by_name in report.items():
        record = measured.get(key.split(",")[0])
        if record is not None:
            by_name.update(baselines.entries(record))
    (REPORTS / "retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / "retrieval.md").write_text(markdown(report))
    long_tail_plot(report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "beauty"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--encoder", default="pretrain", choices=list(accuracy.VARIANTS), help="accuracy variant")
    p.add_argument("--epochs", type=int, default=200, help="encoder epochs, if it must be trained")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed = 0
    if not args.report_only:
        for seed in args.seeds:
            for dataset in args.datasets:
                if not pretrain_only(dataset, seed, args):
                    failed += 1
                    continue
                for variant in args.variants:
                    failed += not run_one(dataset, variant, seed, args)
                    write_report()
    write_report()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
