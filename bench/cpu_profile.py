"""Where the server's CPU goes under load: py-spy samples of every worker while the open-loop generator
sends the load benchmark's mixed traffic (``bench.loadgen.mixed_traffic``) at one rate.

    python -m bench.cpu_profile --model runs/retrieval/beauty/pretrain-transitions-seed1 --rate 1000

Writes each worker's raw samples (``py-spy record -f raw``: one line per distinct stack, its count) to
``--out`` and a section ``profile`` (or ``--section``) of ``reports/service.json`` with the breakdown:
each sample is charged to the first component its stack names, from the innermost frame out
(:data:`COMPONENTS`), so a NumPy or torch call counts for the memrec code that made it. Only samples of
running threads count (py-spy leaves out idle ones): shares of the CPU the workers used, not of the wall.
``--source`` serves another checkout of the repository (its ``service`` package), e.g. the tree before a
change, with this tree's generator and breakdown.

py-spy is not a dependency of the service: ``pip install py-spy`` (the ``bench`` extra has it).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.loadgen import mixed_traffic, open_loop, run_fast
from bench.service import BENCH_REDIS_URL
from bench.service_report import write_reports
from bench.serving import flush, launch, serve_argv

log = logging.getLogger(__name__)


def _socket_writes() -> tuple[str, ...]:
    """The frames of uvicorn's HTTP protocol at its ``transport.write`` calls ("file:line)"): a sample
    whose innermost Python frame is one of them is in the C write to the socket."""
    import uvicorn.protocols.http.httptools_impl as impl

    lines = Path(impl.__file__).read_text().splitlines()
    return tuple(f"httptools_impl.py:{n})" for n, text in enumerate(lines, 1) if "transport.write" in text)


# (component, substrings of a frame "function (file:line)"), matched from the innermost frame out; the
# first component a frame matches takes the sample. Generic libraries (numpy, torch, asyncio's
# coroutine plumbing) match nothing themselves, so their time goes to the caller that asked for it.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("encoder", ("Predictor.encode (", "SASRec.encode (", "SASRec.forward (", "_Encode.forward (")),
    ("search (FAISS)", ("faiss", "memory_store/index.py", "memory_store/columns.py")),
    ("transition rows", ("memory_store/transitions.py",)),
    (
        "scoring (fusion, vote, channel, top n)",
        ("model/predictor.py", "model/vote.py", "model/transitions.py", "model/fusion.py", "model/sasrec.py"),
    ),
    ("store client (Redis)", ("redis/", "memory_store/redis_store/", "memory_store/states.py", "hiredis")),
    ("interactions (ingest)", ("service/ingest.py", "service/routes/interactions.py")),
    ("answer JSON", ("service/routes/recommend.py", "service/responses.py", "orjson")),
    ("pipeline glue", ("service/pipeline.py", "service/states.py")),
    ("metrics", ("prometheus_client", "service/middleware.py", "service/metrics.py")),
    ("request parsing and validation", ("pydantic", "fastapi/dependencies", "fastapi/encoders")),
    ("socket writes", _socket_writes()),
    ("HTTP server (uvicorn, starlette, FastAPI)", ("uvicorn", "starlette", "fastapi", "httptools", "h11")),
    ("event loop", ("asyncio", "uvloop")),
)
OTHER = "other"
PROFILE_REDIS_URL = BENCH_REDIS_URL  # the load benchmark's database: run one or the other at a time


def component(stack: str) -> str:
    """The component a sample's stack ("frame;frame;…", outermost first) is charged to."""
    for frame in reversed(stack.split(";")):
        for name, marks in COMPONENTS:
            if any(m in frame for m in marks):
                return name
    return OTHER


def breakdown(raw: str) -> Counter[str]:
    """Samples per component of py-spy's raw output (lines "stack count")."""
    out: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[component(stack)] += int(count)
    return out


def workers_of(parent: int) -> list[int]:
    """The server's worker processes (the children of ``memrec serve``), or the server itself."""
    path = Path(f"/proc/{parent}/task/{parent}/children")
    children = [int(p) for p in path.read_text().split()] if path.is_file() else []
    return children or [parent]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (``/proc/{pid}/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    return total / tick


def record(pids: list[int], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on each pid for ``seconds`` (raw samples to ``out/worker-{i}.txt``)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    procs = []
    for i, pid in enumerate(pids):
        cmd = [spy, "record", "--nonblocking", "-d", str(int(seconds)), "-p", str(pid)]
        cmd += ["-o", str(out / f"worker-{i}.txt"), "-f", "raw"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flush(PROFILE_REDIS_URL)
    env = {"MEMREC_TORCH_THREADS": "1", "MEMREC_LOG_LEVEL": "warning", "MEMREC_WORKERS": str(args.workers)}
    env |= {"MEMREC_NPROBE": str(args.nprobe), "MEMREC_BATCH_MAX_WAIT_MS": str(args.batch_wait_ms)}
    if args.source:  # run there: ``python -m`` puts the working directory first on the path
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    result: dict[str, Any] = {"model": model.name, "rate": args.rate, "seconds": args.seconds}
    result |= {"workers": args.workers, "source": "another checkout" if args.source else "this tree"}
    result["batch_max_wait_ms"] = args.batch_wait_ms
    result["load_average_at_start"] = os.getloadavg()[0]
    with tempfile.TemporaryFile() as server_out:
        argv = serve_argv(model.resolve(), PROFILE_REDIS_URL)
        proc, port = launch(argv, env, "/readyz", server_out, cwd=Path(args.source) if args.source else None)
        try:
            run_fast(open_loop("127.0.0.1", port, 100, 2.0, mixed_traffic(model, 9)))  # warm-up
            workers = workers_of(proc.pid)
            cpu0 = cpu_seconds(workers)
            spies = [] if args.no_spy else record(workers, args.seconds, out)
            load = run_fast(open_loop("127.0.0.1", port, args.rate, args.seconds + 2.0, mixed_traffic(model)))
            cpu = cpu_seconds(workers) - cpu0
            for spy in spies:
                spy.wait(timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    flush(PROFILE_REDIS_URL)
    counts: Counter[str] = Counter()
    for path in [] if args.no_spy else sorted(out.glob("worker-*.txt")):
        counts += breakdown(path.read_text())
    total = sum(counts.values())
    result |= {"achieved_rps": load["achieved_rps"], "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"]}
    # the workers' CPU over the load window (py-spy's sampling included, the same for every run)
    result |= {"cpu_ms_per_request": 1000.0 * cpu / load["sent"], "by_route": load["by_route"]}
    result |= {"samples": total, "share": {k: v / total for k, v in counts.most_common()} if total else {}}
    for name, share in result["share"].items():
        log.info("%5.1f %%  %s", 100 * share, name)
    log.info("%.2f ms of worker CPU per request, p50 %.1f ms, p99 %.1f ms", result["cpu_ms_per_request"],
             load["p50_ms"], load["p99_ms"])  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="artifacts/beauty")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=3.0)
    parser.add_argument("--source", help="serve this checkout of the repository instead (e.g. a baseline)")
    parser.add_argument("--out", default="runs/profiles/service", help="where the raw samples go")
    parser.add_argument("--section", default="profile", help="report key")
    parser.add_argument("--no-spy", action="store_true", help="CPU per request only, no py-spy samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "bench.cpu_profile", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    result = run_profile(args)
    log.info("profiled in %.0f s", time.perf_counter() - t0)
    write_reports(args.section, result, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
