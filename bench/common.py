"""What the accuracy benchmarks share: the machine record, running `memrec train` in a child process,
one result file per (dataset, variant, seed), and the mean ± std aggregation over whatever seeds exist."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
# Model directories and checkpoints (large, not committed); MEMREC_RUNS_DIR puts them elsewhere.
RUNS = Path(os.environ.get("MEMREC_RUNS_DIR", ROOT / "runs"))
METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")
PROTOCOLS = ("unmasked", "masked")
# What a result file copies from `memrec train`'s output besides the metrics.
RUN_KEYS = ("model_version", "best_epoch", "epochs_run", "sec_per_epoch", "peak_rss_mb", "train_seconds")
GROUPS = ("unmasked_head", "unmasked_tail", "masked_head", "masked_tail")  # by target popularity


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_label(m: dict[str, Any]) -> str:
    return f"{m['cpu']} ({m['cores']} cores)" + (f" + {m['gpu']}" if "gpu" in m else "")


def display_path(path: Path) -> str:
    """A path as the report shows it: relative to the repository, or under `runs/`."""
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return str(Path("runs") / path.relative_to(RUNS)) if path.is_relative_to(RUNS) else path.name


CLI = "service.cli"  # the module of `memrec`


def train_cli(
    args: Sequence[str],
    *,
    device: str | None,
    threads: int | None,
    data_dir: str | None,
    module: str = CLI,
) -> tuple[dict[str, Any] | None, str]:
    """Run `memrec train ARGS` in a child process, or `python -m MODULE train ARGS` (a benchmark
    control with memrec's flags, bench.controls) → (its JSON output or None on failure, the command as a
    user would type it, without machine paths)."""
    extra = [*(["--device", device] if device else []), *(["--threads", str(threads)] if threads else [])]
    cmd = [sys.executable, "-m", module, "train", *args, *extra]
    program = ["memrec"] if module == CLI else ["python", "-m", module]
    recorded = shlex.join([*program, "train", *args, *extra])
    recorded = recorded.replace(str(RUNS), "runs").replace(str(ROOT) + "/", "")
    if data_dir:
        cmd += ["--data-dir", data_dir]
    log.info("running %s", recorded)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        log.error("failed with exit code %d: %s", proc.returncode, recorded)
        return None, recorded
    out: dict[str, Any] = json.loads(proc.stdout)
    return out, recorded


def evaluate_cli(model_dir: Path, *, device: str | None, data_dir: str | None) -> dict[str, Any] | None:
    """`memrec evaluate --model DIR` in a child process → its JSON output, None on failure."""
    cmd = [sys.executable, "-m", "service.cli", "evaluate", "--model", str(model_dir)]
    cmd += [*(["--device", device] if device else []), *(["--data-dir", data_dir] if data_dir else [])]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        log.error("evaluation of %s failed with exit code %d", display_path(model_dir), proc.returncode)
        return None
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def write_report(
    name: str, module: str, argv: Sequence[str] | None, result: dict[str, Any], markdown: Callable[..., str]
) -> None:
    """``reports/{name}.json`` and ``.md`` of one run of ``python -m {module}``: the result with its
    command (``argv``, default the process's), machine and date."""
    args = list(argv) if argv is not None else sys.argv[1:]
    result["command"] = shlex.join(["python", "-m", module, *args])
    result["machine"] = machine_label(machine())
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    (REPORTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPORTS / f"{name}.md").write_text(markdown(result))


def write_result(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A record that carries its own machine (a result trained elsewhere, evaluated here) keeps it.
    record = {"machine": machine(), **record, "date": datetime.now(UTC).isoformat(timespec="seconds")}
    path.write_text(json.dumps(record, indent=2) + "\n")


def run_recorded(
    result_file: Path,
    cli_args: Sequence[str],
    run: Any,
    record: dict[str, Any],
    extra: Sequence[str] = (),
    module: str = CLI,
    measure: Callable[[], dict[str, Any]] | None = None,
) -> bool:
    """One benchmark run: skip it if ``result_file`` exists, else train through `memrec train` (or the
    control ``module``, see :func:`train_cli`) and write ``record`` with the command, the run fields,
    the metrics, the ``extra`` output keys and what ``measure`` returns, called after training.
    ``run`` carries device, threads and data_dir. False if training failed."""
    if result_file.is_file():
        log.info("%s exists, skipping", result_file.name)
        return True
    metrics, command = train_cli(
        cli_args, device=run.device, threads=run.threads, data_dir=run.data_dir, module=module
    )
    if metrics is None:
        return False
    picked = {k: metrics[k] for k in (*RUN_KEYS, *extra) if k in metrics}
    measured = measure() if measure is not None else {}
    write_result(
        result_file,
        {
            **record,
            "command": command,
            **picked,
            **measured,
            "valid": metrics["valid"],
            "test": metrics["test"],
        },
    )
    return True


def stamp(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Result records → the latest of their dates and their machines, as a report heads them (now and
    this machine when they carry none)."""
    dates = [datetime.fromisoformat(r["date"]) for r in records if "date" in r]
    when = (max(dates) if dates else datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    machines = sorted({machine_label(r["machine"]) for r in records if "machine" in r})
    return when, "; ".join(machines) or machine_label(machine())


def stat(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "seeds": values}


K = TypeVar("K")


def grouped_results(runs_dir: Path, key: Callable[[dict[str, Any]], K]) -> dict[K, list[dict[str, Any]]]:
    """Every result file in ``runs_dir``, in file-name order, grouped by ``key`` of its record."""
    groups: dict[K, list[dict[str, Any]]] = {}
    for f in sorted(runs_dir.glob("*.json")):
        r = json.loads(f.read_text())
        groups.setdefault(key(r), []).append(r)
    return groups


def aggregate(runs_dir: Path, section: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Every result file in ``runs_dir`` → {section: {variant: entry}} with mean ± std per metric; the
    section is the dataset unless ``section`` derives another from a record."""
    groups = grouped_results(runs_dir, lambda r: (section(r) if section else r["dataset"], r["variant"]))
    report: dict[str, Any] = {}
    for (dataset, variant), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        entry = {k: v for k, v in rs[0].items() if k in ("objective", "scheme", "encoder", "flags")}
        entry.update(
            {
                "seeds": [r["seed"] for r in rs],
                "test": {
                    p: {m: stat([r["test"][p][m] for r in rs]) for m in METRICS}
                    for p in (*PROTOCOLS, *GROUPS)
                    if all(p in r["test"] for r in rs)
                },
                "valid": {
                    "unmasked": {
                        m: stat([r["valid"]["unmasked"][m] for r in rs]) for m in ("ndcg@10", "hr@10")
                    }
                },
                "best_epoch": [r["best_epoch"] for r in rs],
                "sec_per_epoch": float(np.median([r["sec_per_epoch"] for r in rs])),
                "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs)),
                "machines": sorted({machine_label(r["machine"]) for r in rs}),
                "commands": [r["command"] for r in rs],
                "dates": [r["date"] for r in rs],
            }
        )
        votes = [
            {"seed": r["seed"], **r["vote"]["chosen"], **_vote_pair(r), **_vote_rule(r)}
            for r in rs
            if "vote" in r
        ]
        if votes:  # the memory vote chosen on validation, per seed
            entry["vote"] = votes
        channel = [_transitions(r) for r in rs if "transitions" in r]
        if channel:  # the transition channel chosen on validation, per seed
            entry["transitions"] = channel
        costs = [r["cost"] for r in rs if "cost" in r]
        if costs:  # retrieval cost: the median over seeds of each figure
            entry["cost"] = {k: float(np.median([c[k] for c in costs])) for k in costs[0]}
        report.setdefault(dataset, {})[variant] = entry
    return report


def _transitions(r: dict[str, Any]) -> dict[str, Any]:
    """The λ one seed's validation chose, its z, the candidate it refused if any, and test NDCG@10 and
    HR@10 (unmasked) with and without the channel."""
    t = r["transitions"]
    out: dict[str, Any] = {"seed": r["seed"], "weight": t["chosen"]["weight"], "z": t["z"]}
    cand = t.get("candidate")
    if cand is not None and cand != t["chosen"]:
        out["refused"] = cand["weight"]
    off = t.get("test_without_transitions")
    for m in ("ndcg@10", "hr@10"):
        out[f"{m}_on"] = r["test"]["unmasked"][m]
        out[f"{m}_off"] = (off or r["test"])["unmasked"][m]
    return out


def _vote_rule(r: dict[str, Any]) -> dict[str, Any]:
    """The validation winner's gain over off in standard errors (None: a gain without spread) and, if
    the significance rule refused it, that candidate; nothing for runs recorded before the rule."""
    vote = r["vote"]
    if "z" not in vote:
        return {}
    out: dict[str, Any] = {"z": vote["z"]}
    cand = vote.get("candidate")
    if cand is not None and cand != vote["chosen"]:
        out["refused"] = cand
    return out


def _vote_pair(r: dict[str, Any]) -> dict[str, float]:
    """Test NDCG@10 and HR@10 (unmasked) of a vote run with and without its vote, where recorded."""
    off = r["vote"].get("test_without_vote")
    if off is None:
        return {}
    on = r["test"]["unmasked"]
    return {
        f"{m}_{side}": t[m]
        for m in ("ndcg@10", "hr@10")
        for side, t in (("on", on), ("off", off["unmasked"]))
    }


def fmt(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if len(s["seeds"]) > 1 else f"{s['mean']:.4f}"


def metric_table(rows: list[tuple[str, int, str, dict[str, Any]]]) -> list[str]:
    """rows of (label, seeds, protocol, {metric: stat or float}) → markdown table lines."""
    head = "| variant | seeds | protocol | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for label, n, protocol, values in rows:
        cells = []
        for m in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"):
            v = values.get(m)
            cells.append("–" if v is None else fmt(v) if isinstance(v, dict) else f"{v:.4f}")
        lines.append(f"| {label} | {n if n else '–'} | {protocol} | {' | '.join(cells)} |")
    return lines


def cost_table(variants: dict[str, Any]) -> list[str]:
    lines = ["| variant | best epochs | s/epoch (median) | peak RSS MB | machine |", "|---|---|---|---|---|"]
    for name, v in variants.items():
        if "best_epoch" not in v:  # nothing trained (bench.learned_retriever's frozen-encoder row)
            continue
        cells = [str(v["best_epoch"]), f"{v['sec_per_epoch']:.1f}", f"{v['peak_rss_mb']:.0f}"]
        lines.append(f"| {name} | {' | '.join(cells)} | {'; '.join(v['machines'])} |")
    return lines
