"""End to end: ``memrec serve`` in subprocesses (uvicorn) against the real Redis (database 11), and
against a real 3-master Redis Cluster, two replicas sharing it. Every endpoint, error cases included."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from test_service_support import (  # noqa: F401  (fixtures)
    metric,
    model_dir,
    service_redis,
    start_server,
    toy_root,
    wait_ready,
)


@pytest.fixture(params=["redis", "cluster"])
def two_replicas(
    request: pytest.FixtureRequest,
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> Iterator[list[str]]:
    """Two servers on one Redis, or on one Redis Cluster (the namespace spread over its masters)."""
    cluster = request.param == "cluster"
    url = str(request.getfixturevalue("cluster_redis_url" if cluster else "service_redis"))
    env = {"redis_cluster": "true"} if cluster else {}
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"replica{i}.log" for i in range(2)]
    procs = [start_server(model_dir, url, p, lg, **env) for p, lg in zip(ports, logs, strict=True)]
    bases = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for base, proc, lg in zip(bases, procs, logs, strict=True):
            wait_ready(base, proc, lg)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_two_replicas_serve_every_endpoint(two_replicas: list[str]) -> None:
    a, b = (httpx.Client(base_url=base, timeout=10.0) for base in two_replicas)
    with a, b:
        assert a.get("/livez").json() == {"status": "ok"}
        ready = a.get("/readyz").json()
        assert ready["ready"] and ready["checks"]["store"] == "ok"
        # Both replicas loaded concurrently, yet every bank memory is in Redis once.
        bank = metric(a.get("/metrics").text, "memrec_memory_bank_size")
        assert bank == metric(b.get("/metrics").text, "memrec_memory_bank_size") > 1000
        assert metric(b.get("/metrics").text, "memrec_index_size") == bank

        r = a.post("/recommend", json={"user_id": "u5", "n": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5 and r.json()["k_used"] >= 1

        # An interaction on replica a is retrievable through replica b at once.
        events = [{"user_id": "e2e", "item_id": it, "event_id": f"x{it}"} for it in ("i7", "i33", "i12")]
        assert a.post("/interactions", json={"events": events}).json() == {"accepted": 3, "duplicates": 0}
        deadline = time.monotonic() + 2.0
        while True:
            req = {"user_id": "someone", "history": ["i7", "i33"], "explain": True, "n": 3}
            top = b.post("/recommend", json=req).json()["memories"][0]
            if top["user_id"] == "e2e" or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert top["user_id"] == "e2e" and top["item_id"] == "i12"
        assert b.post("/interactions", json={"events": events}).json() == {"accepted": 0, "duplicates": 3}

        bad = a.post("/interactions", json={"events": [{"user_id": "e2e", "item_id": 7}]})
        assert bad.status_code == 422 and "item_id" in bad.text
        assert a.post("/recommend", json={"user_id": "u5", "n": 5000}).status_code == 422
        assert (
            a.post(
                "/recommend", content=b"not json", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        assert a.get("/docs").status_code == 200
        assert a.get("/nope").status_code == 404
        text = a.get("/metrics").text
        assert (
            'memrec_http_request_duration_seconds_count{method="POST",route="/recommend",status="4xx"}'
            in text
        )
        assert metric(text, "memrec_memory_bank_size") == bank + 2
