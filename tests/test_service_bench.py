"""The service benchmark's pure parts: the rate verdict, the time split and the report rendering."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.drift import drift_section, groups, paired, time_split, transition_replay
from bench.loadgen import max_rate, summarise
from bench.new_items import pool_seeds
from bench.service_report import render_md


def _step(rate: float, p99: float, errors: int = 0) -> dict[str, Any]:
    return {"rate": rate, "achieved_rps": rate, "p50_ms": p99 / 3, "p99_ms": p99, "errors": errors}


def test_max_rate_needs_the_latency_bound_and_no_errors() -> None:
    steps = [_step(100, 9.0), _step(500, 30.0), _step(1000, 45.0, errors=2), _step(1500, 80.0)]
    assert max_rate(steps, 50.0) == 500
    assert max_rate(steps, 25.0) == 100
    assert max_rate(steps, 1.0) == 0.0


def test_time_split_trains_on_the_past_and_replays_known_items(tmp_path: Path) -> None:
    rows = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 4), ("a", "x", 8), ("b", "new", 9)]
    inter = tmp_path / "d.inter"
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    inter.write_text(header + "".join(f"{u}\t{i}\t1\t{t}\n" for u, i, t in rows), encoding="utf-8")
    train, later = time_split(inter, 0.6, tmp_path)
    assert train.read_text() == "a x y z\n"  # b has one earlier event: too short to train on
    assert later == [("b", "x", 4.0), ("a", "x", 8.0)]  # "new" is unknown to the model


def test_a_step_is_the_median_of_its_windows_and_shows_each() -> None:
    windows = [_step(500, p99) | {"sent": 5000, "errors": e} for p99, e in ((31.0, 0), (240.0, 1), (35.0, 0))]
    step = summarise(500, windows)
    assert step["p99_ms"] == 35.0 and step["errors"] == 1 and step["sent"] == 15000  # one stall: not decisive
    assert max_rate([step], 50.0) == 0.0  # but an error in any window still fails the step
    load = {
        "command": "c", "date": "d", "model": "m", "duration_s": 10.0, "rates": [500], "workers": 2,
        "nprobe": 16, "repeats": 3, "batch_max_wait_ms": 1.0, "load_average_at_start": 0.5,
        "steps": [step], "max_rps_p99_50ms": 0.0, "max_rps_p99_25ms": 0.0,
        "floor_bare_fastapi": {"max_rps_p99_50ms": 0.0},
        "floor_pipeline": {"concurrency": 32, "rps": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "n": 1},
        "freshness": {"trials": 1, "not_seen": 0, "p50_ms": 1.0, "p99_ms": 1.0, "n": 1},
    }  # fmt: skip
    md = render_md({"load": load})
    assert "memory vote" not in md
    assert "| 500 | 500 | 11.7 | 35.0 | 31.0, 240.0, 35.0 | 1 |" in md
    assert "3 windows of 10 s per rate (p50, p99: their medians)" in md and "micro-batch wait 1 ms" in md


def test_report_shows_every_figure() -> None:
    pct = {"p50_ms": 1.0, "p99_ms": 2.0, "n": 5}
    report = {
        "load": {
            "command": "python -m bench.service load",
            "date": "today",
            "machine": "cpu (2 cores)",
            "model": "beauty",
            "duration_s": 10.0,
            "rates": [500, 1500],
            "workers": 2,
            "nprobe": 128,
            "load_average_at_start": 1.5,
            "steps": [_step(500, 20.0)],
            "max_rps_p99_50ms": 500.0,
            "max_rps_p99_25ms": 500.0,
            "floor_bare_fastapi": {"max_rps_p99_50ms": 1500.0},
            "floor_pipeline": {"concurrency": 32, "rps": 2000.0, **pct},
            "freshness": {"trials": 5, "not_seen": 0, **pct},
            "cpu_jitter": {"p50_ms": 1.5, "p99_ms": 9.25, "max_ms": 17.0},
            "k": 20,
            "vote": {"weight": 0.1, "temperature": 0.1, "depth": 50},
        },
        "drift": {
            "command": "python -m bench.service drift",
            "date": "yesterday",
            "machine": "other cpu (2 cores)",
            "cut_quantile": 0.9,
            "train_command": "memrec train",
            "live": {
                "events": 10,
                "hr@10": 0.2,
                "ndcg@10": 0.1,
                "memories_after": 7,
                "memories_used": 40,
                "replayed_memories_used": 4,
            },
            "frozen": {"events": 10, "hr@10": 0.1, "ndcg@10": 0.05, "memories_after": 3},
            "hr@10_gain": 0.1,
            "ndcg@10_gain": 0.05,
        },
    }
    report["drift_vote"] = {
        **report["drift"],
        "command": "python -m bench.service drift --vote",
        "vote": {"weight": 0.1, "temperature": 0.05, "depth": 50},
    }
    md = render_md(report)
    assert "## Drift replay, memory vote, 90% cut (`python -m bench.service drift --vote`, yesterday" in md
    assert "weight 0.1, temperature 0.05, 50 voters." in md and "The memory vote is off." in md
    assert "## Load (`python -m bench.service load`, today, cpu (2 cores))" in md  # each its own machine
    assert "## Drift replay, 90% cut (`python -m bench.service drift`, yesterday, other cpu (2 cores))" in md
    assert "bootstrap" not in md  # a run from before the paired comparison: the means only
    assert "`load.max_rps_p99_50ms` = **500** req/s" in md
    assert "K = 20, memory vote λ 0.1, τ 0.1, 50 voters)" in md
    assert "| 500 | 500 | 6.7 | 20.0 | 20.0 | 0 |" in md  # a step of one window
    assert "p50 1.5 ms, p99 9.2 ms, max 17.0 ms" in md
    assert "| live | 0.2000 | 0.1000 | 7 | 40 | 4 |" in md and "HR@10 +0.1000" in md


def test_paired_gain_resamples_users_and_counts_changed_events() -> None:
    frozen = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    users = ["a", "a", "b", "b", "c", "c", "d", "d"]
    same = paired(frozen, frozen, users)
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0], "by_quarter": [0.0] * 4, "events_changed": 0}
    live = frozen.copy()
    live[[0, 2, 4, 5]] = 1.0  # a, b and c gain; d does not
    p = paired(live, frozen, users)
    assert p["mean"] == pytest.approx(0.5) and p["events_changed"] == 4
    assert p["by_quarter"] == [0.5, 0.5, 1.0, 0.0]  # each quarter: two events in replay order
    lo, hi = p["ci95"]
    assert 0.0 <= lo < 0.5 < hi <= 1.0  # users resampled: from all-d draws (0) to all-c draws (1)
    one_user = paired(live, frozen, ["u"] * 8)
    assert one_user["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)]  # one cluster: no spread at all


def test_groups_split_events_by_user_and_item_trend(tmp_path: Path) -> None:
    early = tmp_path / "early.txt"
    early.write_text("a x y z\nb x x y\n", encoding="utf-8")  # before: x 3, y 2, z 1 of 6
    later = [("a", "z", 1.0), ("c", "x", 2.0), ("c", "z", 3.0), ("b", "y", 4.0)]  # after: z 2 of 4
    g = groups(early, later)
    assert g["returning users"].tolist() == [True, False, False, True]
    assert g["new users"].tolist() == [False, True, True, False]
    # z: 2/4 after vs 1/6 before (3x, rising); x: 1/4 vs 3/6; y: 1/4 vs 2/6 (0.75x)
    assert g["rising items"].tolist() == [True, False, True, False]
    assert (g["other items"] == ~g["rising items"]).all()


def test_transition_reference_reads_the_replayed_events_only_when_live(tmp_path: Path) -> None:
    early = tmp_path / "early.txt"
    early.write_text("a x y\nb z w\n", encoding="utf-8")  # x was followed by y; z by w
    later = [("c", "x", 1.0), ("c", "w", 2.0), ("d", "x", 3.0), ("d", "w", 4.0), ("a", "w", 5.0)]
    hit, gain = transition_replay(early, later, live=True)["reference"]
    # c's x → w enters the counts: d after x ranks y, w (tie, first seen first); a's last items y, x
    # score w above y, and y is a's own seen item, masked
    assert hit.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert gain.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0 / math.log2(3), 1.0])
    hit, gain = transition_replay(early, later, live=False)["reference"]
    assert hit.tolist() == [0.0] * 5 and gain.tolist() == [0.0] * 5  # after x only y, never w


def test_transition_mix_reranks_the_model_candidates(tmp_path: Path) -> None:
    early = tmp_path / "early.txt"
    early.write_text("a x y\n", encoding="utf-8")  # x was followed by y
    later = [("b", "y", 1.0)]  # b's history is empty: no transitions to read
    again = [("a", "y", 1.0)]  # a saw x then y: x's transition leads to y, a seen item, no share
    items = [f"i{k}" for k in range(11)] + ["y"]  # the model puts y 12th: out of its top 10
    logits = np.linspace(1.0, 0.0, 12)
    out = transition_replay(early, later, True, 5, [(items, logits)], (0.5,))
    assert out["mix 0.5"][0].tolist() == [0.0]  # no transition share: the model's order stands
    assert transition_replay(early, again, True, 5, [(items, logits)], (0.5,))["mix 0.5"][0][0] == 0.0
    c = tmp_path / "c.txt"
    c.write_text("a x y\nb x\n", encoding="utf-8")  # b's last item x: y takes all the transition share
    out = transition_replay(c, [("b", "y", 1.0)], True, 5, [(items, logits)], (0.0, 0.5))
    assert out["mix 0"][0].tolist() == [0.0] and out["mix 0.5"][0].tolist() == [1.0]
    assert out["mix 0.5"][1][0] == pytest.approx(1.0)  # (1 − λ)·p + λ·1 puts y first


def test_drift_sections_keep_the_first_keys_at_the_90_percent_cut() -> None:
    assert drift_section(False, 0.9) == "drift" and drift_section(True, 0.9) == "drift_vote"
    assert drift_section(True, 0.8) == "drift_vote_cut80" and drift_section(False, 0.75) == "drift_cut75"
    assert drift_section(True, 0.5, transitions=True) == "drift_vote_transitions_cut50"


def test_drift_report_shows_the_paired_gain_and_the_groups() -> None:
    arm = {"events": 8, "hr@10": 0.5, "ndcg@10": 0.25, "memories_after": 9}
    gain = {"mean": 0.125, "ci95": [0.01, 0.25], "by_quarter": [0.0, 0.0, 0.25, 0.25], "events_changed": 3}
    drift = {
        "command": "python -m bench.service drift --cut 0.8", "date": "today", "cut_quantile": 0.8,
        "train_command": "memrec train", "live": arm, "frozen": arm, "hr@10_gain": 0.125,
        "ndcg@10_gain": 0.0625, "paired": {"hr@10": gain, "ndcg@10": gain},
        "groups": {"new users": {"events": 5, "live": {"hr@10": 0.6, "ndcg@10": 0.3},
                                 "frozen": {"hr@10": 0.4, "ndcg@10": 0.2}}},
    }  # fmt: skip
    md = render_md({"drift_cut80": drift, "drift_vote": {**drift, "cut_quantile": 0.9, "vote": {}}})
    assert md.index("## Drift replay, memory vote, 90% cut") < md.index("## Drift replay, 80% cut")
    assert "HR@10 [+0.0100, +0.2500]" in md and "NDCG@10 [+0.01000, +0.25000]" in md
    assert "by quarter of the replay: HR@10 +0.0000, +0.0000, +0.2500, +0.2500" in md
    assert "changed the top 10's hit on 3 events" in md
    assert "| new users | 5 | 0.6000 | 0.4000 | 0.3000 | 0.2000 |" in md
    assert "Memory-only reference" not in md  # runs before the reference have none
    arms = {"live": {"hr@10": 0.3, "ndcg@10": 0.2}, "frozen": {"hr@10": 0.1, "ndcg@10": 0.05},
            "paired": {"hr@10": {**gain, "mean": 0.2}, "ndcg@10": gain}}  # fmt: skip
    ref = {"order": 5, "depth": 200, "reference": arms, "mix 0.5": arms}
    voted = "python -m bench.service drift --cut 0.5 --vote"
    cut50 = {**drift, "cut_quantile": 0.5, "vote": {}, "transitions": ref, "command": voted}
    md = render_md({"drift_vote_cut50": cut50})
    assert "Validation refused the memory vote" in md
    assert "| reference | 0.3000 | 0.1000 | 0.2000 | 0.0500 | +0.2000 [+0.0100, +0.2500] |" in md
    assert "| mix 0.5 | 0.3000 | 0.1000 | 0.2000 | 0.0500 | +0.2000 [+0.0100, +0.2500] |" in md


def test_new_item_replays_pool_their_seeds_event_by_event() -> None:
    """Each event's hit averaged over the seeds' replays; the report names every seed's choice."""
    hits = {0: [1.0, 0.0, 1.0], 2: [0.0, 0.0, 1.0]}
    gains = {0: [1.0, 0.0, 0.5], 2: [0.0, 0.0, 0.5]}
    runs = {s: {"hit": np.array(hits[s]), "gain": np.array(gains[s]), "refused": 1} for s in hits}
    runs = {s: r | {"derived": False} for s, r in runs.items()}
    pooled = pool_seeds(runs)
    assert pooled["hit"].tolist() == [0.5, 0.0, 1.0] and pooled["gain"].tolist() == [0.5, 0.0, 0.5]
    assert pooled["refused"] == 1
    card = {"vote": {"weight": 0.2}, "transition_weight": 0.7}
    figures = {"all": {"hr@10": 0.5, "ndcg@10": 0.3}}
    report = {
        "command": "python -m bench.service new-items", "date": "today", "machine": "cpu",
        "cut_quantile": 0.8, "train_command": "memrec train", "model": card, "events": 3,
        "new_item_events": 1, "new_item_share": 1 / 3, "new_items": 1, "seeds": [0, 2],
        "models": {"0": card, "2": {"vote": {"weight": 0.0}, "transition_weight": 0.5, "hybrid": True}},
        "new_item_weight": 1.0, "weighted_new_item_weight": 5.0,
        "arms": {"live_reject": {**figures, "refused": 1}, "live_accept": {**figures, "refused": 0}},
        "paired": {"live_accept - live_reject": {"hr@10 all": {"mean": 0.1, "ci95": [0.05, 0.2]}}},
    }  # fmt: skip
    md = render_md({"new_items_cut80_seeds": report})
    assert "## Drift replay with new items, 80% cut, 2 seeds (" in md
    assert "seed 0: vote weight 0.2, λ 0.7; seed 2: vote weight 0, λ 0.5, learned hybrid" in md
    assert "*weighted*" not in md  # that arm did not run
    assert "| live_accept - live_reject | hr@10 all | +0.1000 | [+0.0500, +0.2000] |" in md
