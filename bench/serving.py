"""The servers the service benchmarks drive, and the model directory they serve.

Server subprocesses on free loopback ports (``memrec serve``, a bare FastAPI app as a floor), ready
once a health path answers; the Redis database a run uses, flushed before and after; the served
model's user and item vocabulary and the card that identifies it in a report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def flush(url: str) -> None:
    """Empty the Redis database at ``url`` (each benchmark has its own)."""
    import redis

    redis.Redis.from_url(url).flushdb()


def launch(
    argv: list[str],
    env: dict[str, str],
    ready_path: str,
    out: IO[bytes],
    timeout_s: float = 900.0,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server subprocess on a free port (``{port}`` in argv is replaced), output to ``out``, in
    ``cwd`` (default: this one); returns it and its port once ``ready_path`` answers 200. Stopping it
    is the caller's."""
    import httpx

    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in argv]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            out.seek(0)
            raise RuntimeError(f"server exited: {out.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server not ready in time")
        time.sleep(0.5)


@contextmanager
def server(argv: list[str], env: dict[str, str], ready_path: str, timeout_s: float = 900.0) -> Iterator[int]:
    """A server subprocess on a free port; yields the port once ready, stops it afterwards."""
    with tempfile.TemporaryFile() as out:
        proc, port = launch(argv, env, ready_path, out, timeout_s)
        try:
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def bare_app_argv() -> list[str]:
    """A FastAPI app whose /recommend does nothing: the floor of HTTP serving on this machine."""
    code = (
        "import uvicorn\nfrom fastapi import FastAPI\napp = FastAPI()\n"
        "@app.post('/recommend')\nasync def r() -> dict[str, int]:\n    return {'ok': 1}\n"
        "@app.get('/livez')\nasync def z() -> dict[str, int]:\n    return {'ok': 1}\n"
        "uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False)\n"
    )
    return [sys.executable, "-c", code]


def serve_argv(model: Path, redis_url: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--port", "{port}",
            "--redis-url", redis_url]  # fmt: skip


def vocab(model: Path) -> tuple[list[str], list[str]]:
    """The served model's (user ids, item ids)."""
    v = json.loads((model / "vocab.json").read_text(encoding="utf-8"))
    return list(v["users"]), list(v["items"])


def model_card(model: Path) -> dict[str, Any]:
    """What identifies the served model: its version, dataset, bank size and how it scores (its
    inference config; older model directories kept that in their fine-tune config)."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    metrics, finetune = config.get("metrics", {}), config.get("finetune", {})
    path = model / "inference.json"
    if path.is_file():
        inference = json.loads(path.read_text(encoding="utf-8"))
        k, vote, weight = inference["k"], inference["vote"], inference["transitions"]["weight"]
        hybrid = inference.get("hybrid") is not None
    else:
        k, weight, hybrid = finetune.get("k"), finetune.get("transition_weight", 0.0), False
        vote = {key: finetune.get(f"vote_{key}", 0) for key in ("weight", "temperature", "depth")}
    return {
        "model_version": config.get("model_version", ""),
        "bank_memories": metrics.get("memories"),
        "k": k,
        "vote": vote,
        "transition_weight": weight,
        "hybrid": hybrid,  # the learned hybrid ranks in the channel's place (model.hybrid)
        "objective": config.get("train", {}).get("objective"),
        "scheme": config.get("train", {}).get("scheme"),
    }
