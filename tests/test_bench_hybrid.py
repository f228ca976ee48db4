"""bench.hybrid's report: the seeds' result files aggregated beside the strongest baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_bench_baselines import record as baselines_record

from bench import hybrid


def result(seed: int, hybrid_ndcg: float, kept: bool) -> dict[str, Any]:
    def arm(ndcg: float) -> dict[str, dict[str, float]]:
        return {p: {"ndcg@10": ndcg, "hr@10": 2 * ndcg} for p in hybrid.PROTOCOLS}

    return {
        "machine": {"cpu": "cpu", "cores": 2},
        "date": f"2026-12-0{seed + 1}T00:00:00+00:00",
        "run": "beauty.pretrain",
        "seed": seed,
        "channel": {"weight": 0.5, "order": 3},
        "kept": kept,
        "gated": seed == 0,
        "test": {
            "encoder": arm(0.2),
            "channel": arm(0.24),
            "hybrid": arm(hybrid_ndcg),
            **{ablation: arm(0.25) for ablation in hybrid.ABLATIONS},
        },
    }


def test_the_report_gives_each_seeds_gain_over_the_strongest_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = baselines_record()
    base["baselines"]["transitions_tuned"] = {
        "popularity_tiebreak": base["baselines"]["popularity"]["ties_against"]
    }
    (tmp_path / "baselines.json").write_text(json.dumps({"datasets": {"beauty": base}}))
    runs = tmp_path / "hybrid_runs"
    runs.mkdir()
    for seed, ndcg, kept in ((0, 0.30, True), (1, 0.275, False)):
        (runs / f"beauty.pretrain.seed{seed}.json").write_text(json.dumps(result(seed, ndcg, kept)))
    (runs / "default").mkdir()
    default = {
        "dataset": "beauty",
        "seed": 1,
        "kept": True,
        "gated": False,
        "test": {
            "default": result(1, 0.3, True)["test"]["hybrid"],
            "with channel": result(1, 0.3, True)["test"]["channel"],
        },
    }
    (runs / "default" / "beauty.seed1.json").write_text(json.dumps(default))
    monkeypatch.setattr(hybrid, "REPORTS", tmp_path)
    monkeypatch.setattr(hybrid, "RESULTS", runs)
    monkeypatch.setattr(hybrid, "DEFAULTS", runs / "default")
    retrieval_runs = tmp_path / "retrieval_runs"
    retrieval_runs.mkdir()
    before = {"seed": 2, "test": result(2, 0.3, True)["test"]["channel"]}  # another encoder's run: left out
    (retrieval_runs / "beauty.sasrec.transitions.seed2.json").write_text(json.dumps(before))
    before["test"] = {p: {"ndcg@10": 0.22, "hr@10": 0.4} for p in hybrid.PROTOCOLS}
    (retrieval_runs / "beauty.pretrain.transitions.seed2.json").write_text(json.dumps(before))
    monkeypatch.setattr(hybrid, "RETRIEVAL_RUNS", retrieval_runs)
    report = hybrid.aggregate()
    entry = report["runs"]["beauty.pretrain"]
    assert entry["unmasked"]["gain_over_baseline"] == pytest.approx([0.2, 0.1])  # over 0.25
    assert entry["unmasked"]["minus_encoder"] == pytest.approx([0.1, 0.075])
    assert entry["unmasked"]["hybrid"]["ndcg@10"]["mean"] == pytest.approx(0.2875)
    assert report["command"] == "python -m bench.hybrid --runs beauty.pretrain --seeds 0 1"
    md = hybrid.render(report)
    assert (
        "| beauty.pretrain | unmasked | 0.2500 | 0.2000 ± 0.0000 | 0.2400 ± 0.0000 | 0.2875 ± 0.0177 |" in md
    )
    assert (
        "| beauty.pretrain | masked | 0.2875 ± 0.0177 / 0.5750 ± 0.0354 | 0.2500 ± 0.0000 / 0.5000 ± 0.0000 |"
        in md
    )
    assert "+20.0%, +10.0%" in md
    assert (
        "| beauty | 1 | unmasked | 0.3000 | 0.2400 | 0.6000 | 0.4800 | +20.0% | +0.0600 | yes |" in md
        and "| beauty.pretrain | 0, 1 | 3/0.5, 3/0.5 | yes (gated), no |" in md
    )
    # one table per dataset: the baselines, then the models from the encoder up, then the ablations
    labels = [r["label"] for r in report["tables"]["beauty.pretrain"]]
    assert labels[:3] == [
        "popularity",
        "transitions alone, order tuned on validation, popularity tie-break",
        "encoder alone",
    ]
    assert labels.index("default before the hybrid: fusion + vote + tuned channel") == 4
    assert labels[-len(hybrid.ABLATIONS) :] == [f"encoder + hybrid, {a}" for a in hybrid.ABLATIONS]
    assert "| encoder + learned hybrid | 0, 1 | 0.2875 ± 0.0177 | 0.5750 ± 0.0354 |" in md
    assert "| default before the hybrid: fusion + vote + tuned channel | 2 | 0.2200 | 0.4000 | 0.2200 |" in md
    assert "| product default: fusion + vote + learned hybrid | 1 | 0.3000 | 0.6000 |" in md
    assert md.index("## beauty (pretrain encoder)") < md.index("## All runs")


def test_a_seed_without_an_archived_encoder_is_skipped_so_seeds_accumulate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "hybrid_runs"
    runs.mkdir()
    (runs / "beauty.pretrain.seed0.json").write_text(json.dumps(result(0, 0.3, True)))
    for name, value in (("REPORTS", tmp_path), ("RESULTS", runs), ("DEFAULTS", runs / "default")):
        monkeypatch.setattr(hybrid, name, value)
    monkeypatch.setattr(hybrid, "ENCODERS", tmp_path / "encoders")  # holds no encoder
    assert hybrid.main(["--runs", "beauty.pretrain", "--seeds", "0", "1"]) == 0
    assert sorted(f.name for f in runs.glob("*.json")) == ["beauty.pretrain.seed0.json"]
    assert json.loads((tmp_path / "hybrid.json").read_text())["runs"]["beauty.pretrain"]["seeds"] == [0]
