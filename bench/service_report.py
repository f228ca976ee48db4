"""The service benchmarks' report: ``reports/service.json`` (one section per run, each with its command,
date and machine) and ``reports/service.md`` rendered from all of its sections."""

from __future__ import annotations

import json
import time
from typing import Any

from bench.common import REPORTS, machine, machine_label
from bench.new_items import new_items_md
from bench.retrain import retrain_md
from bench.swap import swap_md


def write_reports(section: str, result: dict[str, Any], command: str) -> None:
    path = REPORTS / "service.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    report.pop("machine", None)  # each section records its own: they are run on different days
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report[section] = {**result, "command": command, "date": when, "machine": machine_label(machine())}
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (REPORTS / "service.md").write_text(render_md(report), encoding="utf-8")


def _load_md(load: dict[str, Any]) -> list[str]:
    lines = [
        f"## Load (`{load['command']}`, {load['date']}, {load.get('machine', 'machine not recorded')})",
        "",
        f"Model: `{load['model']}` (`{load.get('model_version', '?')}`, {load.get('objective')}/"
        f"{load.get('scheme')} encoder, K = {load.get('k')}{_vote(load)}) with its full memory bank of "
        f"{load.get('bank_memories')} memories, Redis backend, {load['workers']} server "
        f"process(es), nprobe {load['nprobe']}{_batch_wait(load)}; open loop on loopback, "
        f"{_windows(load)}, 90 % /recommend + 10 % /interactions; latency counts from each request's "
        "scheduled time. 1-minute load average when the run started: "
        f"{load['load_average_at_start']:.1f} on 2 cores (other jobs share the machine).",
        "",
        "| rate (req/s) | achieved | p50 ms | p99 ms | p99 of each window ms | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in load["steps"]:
        cells = [f"{s['rate']:.0f}", f"{s['achieved_rps']:.0f}", f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}"]
        each = ", ".join(f"{w['p99_ms']:.1f}" for w in s.get("windows", [s]))
        lines.append("| " + " | ".join([*cells, each, str(s["errors"])]) + " |")
    bare, pipe, fresh = load["floor_bare_fastapi"], load["floor_pipeline"], load["freshness"]
    return [
        *lines,
        "",
        f"- `load.max_rps_p99_50ms` = **{load['max_rps_p99_50ms']:.0f}** req/s "
        f"(p99 ≤ 25 ms up to {load['max_rps_p99_25ms']:.0f} req/s).",
        f"- Floor, bare FastAPI endpoint under the same generator: p99 ≤ 50 ms up to "
        f"{bare['max_rps_p99_50ms']:.0f} req/s"
        + (" (the highest rate tried)." if bare["max_rps_p99_50ms"] >= max(load["rates"]) else ".")
        + _bare_ratio(load),
        f"- Floor, in-process pipeline (no HTTP, {pipe['concurrency']} concurrent callers): "
        f"{pipe['rps']:.0f} req/s, p50 {pipe['p50_ms']:.1f} ms, p99 {pipe['p99_ms']:.1f} ms.",
        f"- Freshness (/interactions answer → memory retrieved): p50 {fresh['p50_ms']:.1f} ms, "
        f"p99 {fresh['p99_ms']:.1f} ms, {fresh['trials']} trials, {fresh['not_seen']} never seen.",
        *_jitter_md(load),
        "",
    ]


def _bare_ratio(load: dict[str, Any]) -> str:
    """The bare floor's p99 per rate and the service's highest rate at p99 ≤ 25 ms against the floor's
    (runs before the floor's 25 ms verdict was kept: nothing)."""
    bare = load["floor_bare_fastapi"]
    if "max_rps_p99_25ms" not in bare:
        return ""
    per_rate = ", ".join(f"{s['p99_ms']:.1f} ms at {s['rate']:.0f}" for s in bare["steps"])
    floor = bare["max_rps_p99_25ms"]
    ratio = f"{load['max_rps_p99_25ms'] / floor:.2f}" if floor else "n/a"
    return (
        f" Its p99: {per_rate}. At p99 ≤ 25 ms the service reaches {load['max_rps_p99_25ms']:.0f} req/s, "
        f"the floor {floor:.0f} req/s: a ratio of {ratio}."
    )


def _vote(load: dict[str, Any]) -> str:
    vote = load.get("vote") or {}
    out = ""
    if vote.get("weight"):
        out += f", memory vote λ {vote['weight']:g}, τ {vote['temperature']:g}, {vote['depth']} voters"
    if load.get("transition_weight"):
        out += f", transition channel λ {load['transition_weight']:g}"
    elif "transition_weight" in load:
        out += ", no transition channel"
    return out


def _windows(load: dict[str, Any]) -> str:
    repeats = load.get("repeats", 1)  # runs before repeated windows: one window per rate
    if repeats == 1:
        return f"{load['duration_s']:.0f} s per rate"
    return f"{repeats} windows of {load['duration_s']:.0f} s per rate (p50, p99: their medians)"


def _batch_wait(load: dict[str, Any]) -> str:
    wait = load.get("batch_max_wait_ms")
    return "" if wait is None else f", micro-batch wait {wait:g} ms"


def _jitter_md(load: dict[str, Any]) -> list[str]:
    if "cpu_jitter" not in load:  # runs before the jitter probe existed
        return []
    j = load["cpu_jitter"]
    return [
        "- Host CPU jitter before the run: identical ~1.5 ms chunks of Python work took "
        f"p50 {j['p50_ms']:.1f} ms, p99 {j['p99_ms']:.1f} ms, max {j['max_ms']:.1f} ms "
        "(the host's scheduling noise, which every "
        "tail latency above includes)."
    ]


def _arms_cells(r: dict[str, Any]) -> list[str]:
    """HR@10 and NDCG@10 of the live and frozen arms, then the paired HR@10 gain with its interval."""
    d = r["paired"]["hr@10"]
    cells = [f"{r[a][m]:.4f}" for m in ("hr@10", "ndcg@10") for a in ("live", "frozen")]
    return [*cells, f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"]


def _drift_md(drift: dict[str, Any], title: str) -> list[str]:
    vote = drift.get("vote", {})
    voting = (
        f"The memory vote, chosen on validation: weight {vote['weight']:g}, temperature "
        f"{vote['temperature']:g}, {vote['depth']} voters."
        if vote.get("weight")
        else "Validation refused the memory vote, so it is off."
        if "--vote" in drift["command"].split()
        else "The memory vote is off."
    )
    if drift.get("transition_weight"):
        voting += f" The transition channel, chosen on validation: λ {drift['transition_weight']:g}."
    elif "--transitions" in drift["command"].split():
        voting += " Validation refused the transition channel, so it is off."
    lines = [
        f"## {title} (`{drift['command']}`, {drift['date']}, {drift.get('machine', 'machine not recorded')})",
        "",
        f"ml-100k split by time at the {drift['cut_quantile']:.0%} quantile; model trained on the earlier "
        f"part (`{drift['train_command']}`); the first {drift['live']['events']} later interactions "
        "replayed in time order, each preceded by /recommend (n = 10, seen items masked). " + voting,
        "",
        "| memory bank | HR@10 | NDCG@10 | memories at the end | fused memories | of them replayed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("live", "frozen"):
        d = drift[name]
        cells = [f"{d['hr@10']:.4f}", f"{d['ndcg@10']:.4f}", str(d["memories_after"])]
        cells += [str(d.get("memories_used", "")), str(d.get("replayed_memories_used", ""))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gain = f"HR@10 {drift['hr@10_gain']:+.4f}, NDCG@10 {drift['ndcg@10_gain']:+.5f}"
    lines += ["", f"Live minus frozen: {gain}."]
    if "paired" in drift:  # runs before the paired comparison existed have the means only
        p = drift["paired"]
        lines[-1] += (
            " Paired over the same events, 95 % bootstrap intervals: HR@10 "
            f"[{p['hr@10']['ci95'][0]:+.4f}, {p['hr@10']['ci95'][1]:+.4f}], NDCG@10 "
            f"[{p['ndcg@10']['ci95'][0]:+.5f}, {p['ndcg@10']['ci95'][1]:+.5f}]; the live bank changed "
            f"the top 10's hit on {p['hr@10']['events_changed']} events and the NDCG on "
            f"{p['ndcg@10']['events_changed']}."
        )
        quarters = ", ".join(f"{q:+.4f}" for q in p["hr@10"]["by_quarter"])
        lines[-1] += f" Live minus frozen by quarter of the replay: HR@10 {quarters}."
    if "groups" in drift:
        lines += [
            "",
            "By event (rising items: a share of the replayed events at least 1.5 times their share "
            "before the cut):",
            "",
            "| events | n | HR@10 live | HR@10 frozen | NDCG@10 live | NDCG@10 frozen |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, g in drift["groups"].items():
            cells = [str(g["events"]), f"{g['live']['hr@10']:.4f}", f"{g['frozen']['hr@10']:.4f}"]
            cells += [f"{g['live']['ndcg@10']:.4f}", f"{g['frozen']['ndcg@10']:.4f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "transitions" in drift:
        t = drift["transitions"]
        lines += [
            "",
            f"Model-free reference over the same events (items that followed the user's last {t['order']} "
            "items in the stored sequences, no model), and the model's top "
            f"{t.get('depth', '–')} re-ranked by (1 − λ) · its softmax + λ · that transition share, each "
            "with its own arm's counts (λ picked here on the replay itself, so a bound on what a tuned mix "
            "would keep):",
            "",
            "| ranking | HR@10 live | HR@10 frozen | NDCG@10 live | NDCG@10 frozen | live − frozen HR@10 |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for entry, r in t.items():
            if isinstance(r, dict):
                lines.append(f"| {entry} | " + " | ".join(_arms_cells(r)) + " |")
    return [*lines, ""]


def _profile_md(key: str, prof: dict[str, Any]) -> list[str]:
    """A CPU profile under load (bench.cpu_profile): each component's share of the workers' samples."""
    lines = [
        f"## CPU profile, `{key}` (`{prof['command']}`, {prof['date']}, {prof.get('machine', '?')})",
        "",
        f"py-spy samples of the {prof['workers']} server process(es) serving `{prof['model']}` "
        f"({prof['source']}{_batch_wait(prof)}) for {prof['seconds']:.0f} s of 90/10 mixed traffic at "
        f"{prof['rate']:.0f} req/s (achieved {prof['achieved_rps']:.0f}, p50 {prof['p50_ms']:.1f} ms, p99 "
        f"{prof['p99_ms']:.1f} ms{_cpu_per_request(prof)}); {prof['samples']} samples of running threads, "
        "each charged to the "
        "first component its stack names from the innermost frame out. 1-minute load average at the "
        f"start: {prof['load_average_at_start']:.1f} on 2 cores.",
        "",
        "| component | share of the workers' CPU |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {100 * share:.1f} % |" for name, share in prof["share"].items()]
    return [*lines, ""]


def _cpu_per_request(prof: dict[str, Any]) -> str:
    if "cpu_ms_per_request" not in prof:
        return ""
    return f", {prof['cpu_ms_per_request']:.2f} ms of the workers' CPU per request"


def render_md(report: dict[str, Any]) -> str:
    lines = ["# Service benchmarks", ""]
    for key in sorted(k for k in report if k.startswith("load")):  # load, load_fine, ...: more sweeps
        if key in report:
            lines += _load_md(report[key])
    for key in sorted(k for k in report if k.startswith("profile")):
        lines += _profile_md(key, report[key])
    drifts = sorted(
        (k for k in report if k.startswith("drift")), key=lambda k: (-report[k]["cut_quantile"], k)
    )
    for key in drifts:
        title = (
            "Drift replay"
            + (", memory vote" if "_vote" in key else "")
            + (", transition channel" if "_transitions" in key else "")
            + f", {report[key]['cut_quantile']:.0%} cut"
        )
        lines += _drift_md(report[key], title)
    for key in sorted(k for k in report if k.startswith("new_items")):
        lines += new_items_md(key, report[key])
    for key in sorted(k for k in report if k.startswith("retrain")):
        lines += retrain_md(key, report[key])
    for key in sorted(k for k in report if k.startswith("swap")):
        lines += swap_md(key, report[key])
    return "\n".join(lines)
