"""The service benchmark's pure parts: the rate verdict, the time split and the report rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.service import max_rate, render_md, summarise, time_split


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
    assert "## Drift replay, memory vote (`python -m bench.service drift --vote`, yesterday" in md
    assert "weight 0.1, temperature 0.05, 50 voters." in md and "The memory vote is off." in md
    assert "## Load (`python -m bench.service load`, today, cpu (2 cores))" in md  # each its own machine
    assert "## Drift replay (`python -m bench.service drift`, yesterday, other cpu (2 cores))" in md
    assert "`load.max_rps_p99_50ms` = **500** req/s" in md
    assert "K = 20, memory vote λ 0.1, τ 0.1, 50 voters)" in md
    assert "| 500 | 500 | 6.7 | 20.0 | 20.0 | 0 |" in md  # a step of one window
    assert "p50 1.5 ms, p99 9.2 ms, max 17.0 ms" in md
    assert "| live | 0.2000 | 0.1000 | 7 | 40 | 4 |" in md and "HR@10 +0.1000" in md
