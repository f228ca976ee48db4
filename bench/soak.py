"""Soak benchmark and reliability report → ``reports/reliability.json`` and ``reports/reliability.md``.

1. A short open-loop sweep measures the highest rate with p99 ≤ 50 ms on this machine now, then the
   server runs ``--duration`` seconds (10 minutes by default) at
   ``--fraction`` (70 %) of the service benchmark's figure (``reports/service.json``; this sweep's
   when there is none) with the service benchmark's mixed traffic (90 % /recommend, 10 %
   /interactions), on the Redis backend with a memory capacity set so that eviction happens during the
   run. Every ``--window`` seconds it records p50/p99, status codes, the resident memory of the server
   processes and the memory-bank size.
2. The fault and bad-input tests run under pytest; their outcomes make the table of cases tried.

    python -m bench.soak --model artifacts/beauty
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import REPORTS, ROOT, machine, machine_label
from bench.loadgen import max_rate, mixed_traffic, open_loop, run_fast, sweep
from bench.serving import flush, launch, model_card, serve_argv

log = logging.getLogger("bench.soak")

SOAK_REDIS_URL = "redis://127.0.0.1:6379/14"
SWEEP_RATES = [100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 500.0]

# pytest node → (case, what must happen). The outcome column comes from the pytest run.
CASES: list[tuple[str, str, str]] = [
    (
        "tests/test_service_faults.py::test_redis_killed_under_writes_loses_nothing_acknowledged",
        "Redis SIGKILLed during a stream of /interactions, restarted from its append-only file",
        "writes answer 503 (never 500) while down; /readyz false; /recommend degraded (200); every "
        "acknowledged batch present afterwards; refused batches retried once each",
    ),
    (
        "tests/test_service_faults.py::test_api_killed_and_restarted_answers_the_same",
        "API process SIGKILLed and restarted; then restarted on a truncated index snapshot",
        "restart = snapshot + log replay, identical rankings and memories; damaged snapshot named, "
        "rebuilt from Redis, identical rankings",
    ),
    (
        "tests/test_service_faults.py::test_a_replica_behind_shows_lag_and_catches_up",
        "a replica stops applying the replication log",
        "pending entries and lag in /metrics; catches up, retrieves what it missed, follows live again",
    ),
    (
        "tests/test_service_faults.py::test_corrupt_model_or_snapshot_stops_start_up_and_damages_nothing",
        "truncated model weights, unparsable config.json, truncated embedded-store snapshot",
        "start-up fails naming the file; store folder byte-identical afterwards",
    ),
    (
        "tests/test_service_fuzz.py::test_fuzz_every_operation",
        "schemathesis: schema-valid and schema-violating requests to every operation (Redis, API key)",
        "no 5xx, documented statuses and schemas, every 4xx explained, key enforced",
    ),
    (
        "tests/test_service_bad_input.py::test_odd_but_valid_requests_are_answered",
        "unknown user, empty history, 1000-item history, n above the catalogue, unicode user ids",
        "200 with the documented answer (cold start: popular items)",
    ),
    (
        "tests/test_service_bad_input.py::test_duplicates_and_timestamps_in_one_batch",
        "duplicate event ids, out-of-order and equal timestamps in one batch",
        "duplicates counted not stored; arrival order kept",
    ),
    (
        "tests/test_service_bad_input.py::test_bad_recommend_requests",
        "negative / huge / non-integer n, 257-character user id, 1001-item history, wrong types",
        "422 naming the field",
    ),
    (
        "tests/test_service_bad_input.py::test_bad_bodies_and_content_types",
        "text/plain and form bodies, empty and truncated JSON, NaN and 1e400 timestamps, lone "
        "surrogates, 5000-character item id, empty event id, 2 MB chunked body",
        "422 (413 for the body) with an explanation; nothing stored",
    ),
    (
        "tests/test_service_api.py::test_rejected_batches_store_nothing",
        "batches with an unknown item, a missing field, a bad timestamp, 1001 events, no events",
        "422 / 413, nothing of the batch stored",
    ),
    (
        "tests/test_service_auth.py::test_routes_need_the_key",
        "missing, wrong and Basic-scheme API keys; /metrics with and without the key setting",
        "401 with WWW-Authenticate; probes open; the rejected write not stored; key never logged",
    ),
    (
        "tests/test_store_redis.py::test_tls_with_a_ca_file",
        "Redis TLS-only (rediss://) with a private CA: without the CA file, with it, CA file on a plain URL",
        "untrusted certificate refused; store works over TLS with the CA; misconfiguration named",
    ),
    (
        "tests/test_store_redis.py::test_password_is_sent_and_never_shown",
        "Redis with requirepass: no password, wrong password, unreachable URL with a password",
        "clear connection error without the password in it",
    ),
]


def service_benchmark_rate() -> float:
    """The service benchmark's highest rate with p99 ≤ 50 ms (``reports/service.json``), 0 if none."""
    path = REPORTS / "service.json"
    if not path.is_file():
        return 0.0
    return float(json.loads(path.read_text()).get("load", {}).get("max_rps_p99_50ms", 0.0))


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (uvicorn workers), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024.0


def bank_size(port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines() if ln.startswith("memrec_memory_bank_size "))
    return int(float(line.split()[1]))


def soak(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model)
    card = model_card(model)
    bank = int(card["bank_memories"] or 0)
    writes = int(args.duration * 0.1 * 1000)  # upper bound on new memories at any rate ≤ 1000/s
    capacity = args.capacity or bank + writes // 20
    env = {"MEMREC_TORCH_THREADS": "1", "MEMREC_LOG_LEVEL": "warning", "MEMREC_WORKERS": str(args.workers)}
    env["MEMREC_CAPACITY"] = str(capacity)
    flush(SOAK_REDIS_URL)
    result: dict[str, Any] = {"model": model.name, **card, "workers": args.workers, "capacity": capacity}
    result["load_average_at_start"] = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out:
        proc, port = launch(serve_argv(model, SOAK_REDIS_URL), env, "/readyz", out)
        try:
            run_fast(open_loop("127.0.0.1", port, 100, 3.0, mixed_traffic(model, 9)))  # warm-up
            steps = sweep(port, args.sweep_rates, args.sweep_duration, mixed_traffic(model, 1))
            sustainable = max_rate(steps, 50.0)
            reference = service_benchmark_rate() or sustainable
            rate = args.rate or round(args.fraction * reference)
            if rate <= 0:
                raise RuntimeError("no sustainable rate found: pass --rate")
            result |= {
                "sweep": steps,
                "max_rps_p99_50ms": sustainable,
                "reference_rps": reference,
                "rate": rate,
            }
            log.info("sweep: p99 <= 50 ms up to %.0f/s; reference %.0f/s; soaking at %d/s for %.0f s",
                     sustainable, reference, rate, args.duration)  # fmt: skip
            windows = []
            make = mixed_traffic(model, 2)  # one stream of requests across the windows
            for w in range(int(args.duration // args.window)):
                step = run_fast(open_loop("127.0.0.1", port, rate, args.window, lambda _: make(0)))
                step |= {"window": w, "rss_mb": process_tree_rss_mb(proc.pid), "bank": bank_size(port)}
                windows.append(step)
                log.info(
                    "window %2d: p50 %.1f ms p99 %.1f ms statuses %s rss %.0f MB bank %d",
                    *(w, step["p50_ms"], step["p99_ms"], step["statuses"], step["rss_mb"], step["bank"]),
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    flush(SOAK_REDIS_URL)
    result["windows"], result["window_s"] = windows, args.window
    result["summary"] = summarise(windows, capacity)
    return result


def summarise(windows: list[dict[str, Any]], capacity: int) -> dict[str, Any]:
    p99 = np.asarray([w["p99_ms"] for w in windows])
    rss = np.asarray([w["rss_mb"] for w in windows])
    statuses: dict[str, int] = {}
    for w in windows:
        for code, n in w["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    base = 1 if len(windows) > 2 else 0  # the first window still warms caches and allocators
    growth = float((rss[-1] - rss[base]) / rss[base])
    half = len(p99) // 2
    return {
        "requests": int(sum(w["sent"] for w in windows)),
        "statuses": statuses,
        "server_errors": int(sum(n for code, n in statuses.items() if code.startswith("5"))),
        "p99_ms_median": float(np.median(p99)),
        "p99_ms_max": float(p99.max()),
        "p99_ms_first_half_median": float(np.median(p99[:half])) if half else float(p99[0]),
        "p99_ms_second_half_median": float(np.median(p99[half:])),
        "rss_mb_start": float(rss[base]),
        "rss_mb_end": float(rss[-1]),
        "rss_growth": growth,
        "bank_end": int(windows[-1]["bank"]),
        "capacity": capacity,
    }


def run_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the fault and bad-input tests; one row per case with pytest's outcome and duration."""
    nodes = [c[0] for c in CASES]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *nodes]
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        outcomes: dict[str, tuple[str, float]] = {}
        for tc in ET.parse(junit).getroot().iter("testcase"):
            name = tc.get("name", "").split("[")[0]
            failed = any(child.tag in ("failure", "error") for child in tc)
            skipped = any(child.tag == "skipped" for child in tc)
            outcome = "failed" if failed else "skipped" if skipped else "passed"
            prev = outcomes.get(name, ("passed", 0.0))
            worst = outcome if outcome != "passed" else prev[0]
            outcomes[name] = (worst, prev[1] + float(tc.get("time", 0.0)))
    rows = []
    for node, case, expected in CASES:
        outcome, seconds = outcomes.get(node.split("::")[1], ("not run", 0.0))
        rows.append(
            {"test": node, "case": case, "expected": expected, "outcome": outcome, "seconds": seconds}
        )
    return rows


def render_md(report: dict[str, Any]) -> str:
    lines = ["# Reliability", "", f"Machine: {report['machine']}.", ""]
    if "soak" in report:
        s = report["soak"]
        m = s["summary"]
        lines += [
            f"## Soak (`{s['command']}`, {s['date']})",
            "",
            f"Model `{s['model']}` (`{s['model_version']}`, bank of {s['bank_memories']} memories), Redis "
            f"backend, {s['workers']} server processes, `MEMREC_CAPACITY={s['capacity']}`. Soak at "
            f"**{s['rate']} req/s**, 70 % of the service benchmark's highest rate with p99 ≤ 50 ms "
            f"({s['reference_rps']:.0f} req/s, `reports/service.md`; this run's own 10-second sweep "
            f"reached {s['max_rps_p99_50ms']:.0f} req/s), for {len(s['windows'])} windows of "
            f"{s['window_s']:.0f} s, "
            "open loop, 90 % /recommend + 10 % /interactions. 1-minute load average at the start: "
            f"{s['load_average_at_start']:.1f}.",
            "",
            "| what | target | measured |",
            "|---|---|---|",
            f"| 5xx responses | 0 | {m['server_errors']} of {m['requests']} (statuses {m['statuses']}) |",
            f"| p99 stable | no upward drift | median of window p99s {m['p99_ms_median']:.1f} ms "
            f"(first half {m['p99_ms_first_half_median']:.1f}, "
            f"second half {m['p99_ms_second_half_median']:.1f}); worst window {m['p99_ms_max']:.1f} ms |",
            f"| process memory growth | < 10 % | {100 * m['rss_growth']:+.1f} % "
            f"({m['rss_mb_start']:.0f} → {m['rss_mb_end']:.0f} MB, all server processes, "
            "from the end of the first window) |",
            f"| memory-bank size | = capacity | {m['bank_end']} (capacity {m['capacity']}) |",
            "",
            "| window | achieved req/s | p50 ms | p99 ms | statuses | RSS MB | bank |",
            "|---:|---:|---:|---:|---|---:|---:|",
        ]
        for w in s["windows"]:
            lines.append(
                f"| {w['window']} | {w['achieved_rps']:.0f} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | "
                f"{w['statuses']} | {w['rss_mb']:.0f} | {w['bank']} |"
            )
        lines.append("")
    if "cases" in report:
        c = report["cases"]
        lines += [
            f"## Faults and bad input (`{c['command']}`, {c['date']})",
            "",
            "Each row is a test run by this command; *outcome* is pytest's verdict on it. A passed row",
            "means what the *must happen* column says was asserted, including that nothing acknowledged",
            "was lost.",
            "",
            "| case | must happen | outcome | anything lost | test |",
            "|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lost = "no" if r["outcome"] == "passed" else "see test"
            lines.append(
                f"| {r['case']} | {r['expected']} | {r['outcome']} | {lost} | `{r['test'].split('::')[1]}` |"
            )
        lines.append("")
    return "\n".join(lines)


def write(section: str, body: dict[str, Any], command: str) -> None:
    path = REPORTS / "reliability.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report["machine"] = machine_label(machine())
    report[section] = {**body, "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (REPORTS / "reliability.md").write_text(render_md(report), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/beauty")
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    p.add_argument("--window", type=float, default=30.0, help="seconds per measurement window")
    p.add_argument("--fraction", type=float, default=0.7, help="of the highest sustainable rate")
    p.add_argument("--rate", type=float, default=None, help="soak at this rate instead (skips nothing)")
    p.add_argument("--sweep-rates", type=float, nargs="+", default=SWEEP_RATES)
    p.add_argument("--sweep-duration", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--capacity", type=int, default=None, help="default: bank + a share of the writes")
    p.add_argument("--skip-soak", action="store_true")
    p.add_argument("--skip-cases", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = "python -m bench.soak " + shlex.join(argv if argv is not None else sys.argv[1:])
    if not args.skip_cases:
        write("cases", {"rows": run_cases(args)}, command)
    if not args.skip_soak:
        write("soak", soak(args), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
