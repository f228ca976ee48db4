"""Shared helpers of the service tests: a toy dataset, a model trained on it once per session (cached in
the session's temporary folder), and an in-process app with its lifespan running."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import flushed_redis, redis_db_url

SERVICE_REDIS_DB = 11  # the service tests' database on the suite's Redis (conftest.suite_redis_url)
N_ITEMS = 40


def write_toy_dataset(path: Path, users: int = 120, seed: int = 0) -> Path:
    """``user item item …`` lines; items mostly follow i → i+1 (mod 40), so order carries signal."""
    rng = random.Random(seed)
    lines = []
    for u in range(users):
        cur, seq = rng.randrange(N_ITEMS), []
        for _ in range(rng.randrange(8, 20)):
            seq.append(f"i{cur}")
            cur = (cur + (1 if rng.random() < 0.8 else rng.randrange(N_ITEMS))) % N_ITEMS
        lines.append(f"u{u} " + " ".join(seq))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_toy_model(root: Path, name: str = "model", *extra: str) -> Path:
    """Train (once per folder) a small retrieval-augmented model; returns its directory."""
    out = root / name
    if (out / "config.json").is_file():
        return out
    data = write_toy_dataset(root / "toy.txt")
    cmd = [sys.executable, "-m", "service.cli", "train", "--dataset", str(data), "--out", str(out)]
    cmd += ["--stage", "all", "--epochs", "2", "--ft-epochs", "1", "--k", "5", "--device", "cpu"]
    # The vote is left off unless asked for: on the toy data's tied similarities a cut among its voters
    # would make the parity tests depend on how each index orders ties (see with_vote). The transition
    # channel too, so that each test says which model it serves (see with_transitions).
    cmd += ["--threads", "1", *extra, *([] if "--vote" in extra else ["--no-vote"])]
    cmd += [] if "--transitions" in extra else ["--no-transitions"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=240)
    return out


def start_server(
    model: Path, redis_url: str | None, port: int, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """``memrec serve`` in a child process (its output in ``log``); settings as ``MEMREC_*`` variables."""
    environ = {
        **os.environ,
        "MEMREC_BATCH_MAX_WAIT_MS": "2",
        **{f"MEMREC_{k.upper()}": v for k, v in env.items()},
    }
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--store-dir", str(log.with_suffix(".store"))]
    if redis_url is not None:
        cmd += ["--redis-url", redis_url]
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready in {timeout_s} s:\n{log.read_text()}")


def service_redis_url(suite_redis_url: str) -> str:
    """The service tests' database on the suite's Redis."""
    return redis_db_url(suite_redis_url, SERVICE_REDIS_DB)


@pytest.fixture
def service_redis(suite_redis_url: str) -> Iterator[str]:
    """The service tests' Redis database, flushed before and after each test."""
    yield from flushed_redis(service_redis_url(suite_redis_url), "service")


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in Prometheus text."""
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root: Path = tmp_path_factory.getbasetemp() / "service-models"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def model_dir(toy_root: Path) -> Path:
    return train_toy_model(toy_root)


def with_vote(src: Path, dst: Path, depth: int) -> Path:
    """A copy of model ``src`` whose memory vote is on with ``depth`` voters: set by hand, because on
    the toy data validation may well keep it off."""
    if not dst.is_dir():
        shutil.copytree(src, dst)
        inference = json.loads((dst / "inference.json").read_text())
        inference["vote"] = {"weight": 0.3, "temperature": 0.1, "depth": depth}
        (dst / "inference.json").write_text(json.dumps(inference))
    return dst


def with_transitions(src: Path, dst: Path, weight: float = 0.5) -> Path:
    """A copy of model ``src`` with the transition channel on at ``weight``, set by hand as in
    :func:`with_vote`."""
    if not dst.is_dir():
        shutil.copytree(src, dst)
        inference = json.loads((dst / "inference.json").read_text())
        inference["transitions"]["weight"] = weight
        (dst / "inference.json").write_text(json.dumps(inference))
    return dst


# A hybrid set by hand: the model, the last item's followers and the channel weigh in, a seen item is
# pushed down, and every weight moves with the query (model.hybrid's FEATURES × QUERY_FEATURES).
HYBRID = {
    "weights": [1.0, 2.0, 0.5, 0.3, 0.2, 0.1, 4.0, -1.5, -0.5],
    "gates": [
        [0.2, -0.3, 0.1, 0.0, 0.0, 0.0, 0.5, 0.1, 0.0],
        [-0.1, 0.4, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.2],
        [0.1, 0.0, -0.2, 0.0, 0.1, 0.0, 0.3, -0.2, 0.0],
    ],
    "query_mean": [3.0, 2.0, 1.5],
    "query_std": [1.0, 1.5, 0.5],
}


def with_hybrid(src: Path, dst: Path) -> Path:
    """A copy of model ``src`` scored by the learned hybrid :data:`HYBRID`, set by hand as in
    :func:`with_vote`."""
    if not dst.is_dir():
        shutil.copytree(src, dst)
        inference = json.loads((dst / "inference.json").read_text())
        inference["hybrid"] = HYBRID
        (dst / "inference.json").write_text(json.dumps(inference))
    return dst


@pytest.fixture(scope="session")
def vote_model_dir(model_dir: Path, toy_root: Path) -> Path:
    """16 voters, more than the 5 memories the fusion reads."""
    return with_vote(model_dir, toy_root / "vote", 16)


@asynccontextmanager
async def running_app(**settings: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan running and an httpx client over ASGI (no sockets)."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(**settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client
