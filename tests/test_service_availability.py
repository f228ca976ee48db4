"""Item availability over HTTP: an item marked unavailable through one replica never comes in another's
answers (two ``memrec serve`` processes on one Redis), and comes again once available; explanations say
which memories name an unavailable item; bad requests change nothing; the key, the size cap and the
gauge."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from test_service_support import (  # noqa: F401  (fixtures)
    metric,
    model_dir,
    running_app,
    service_redis,
    start_server,
    toy_root,
    wait_ready,
)

KEY = "k-avail-51d0"
USERS = [f"u{i}" for i in range(0, 120, 7)]


def recommended(client: httpx.Client, user_id: str, **extra: Any) -> list[str]:
    """Every item the service would give the user (n covers the whole toy catalogue)."""
    body = {"user_id": user_id, "n": 40, "exclude_seen": False, **extra}
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    return [it["item_id"] for it in r.json()["items"]]


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the other replica did not apply it in time"
        time.sleep(0.02)


def test_an_unavailable_item_never_comes_from_another_replica(
    model_dir: Path,  # noqa: F811
    service_redis: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"replica{i}.log" for i in range(2)]
    procs = [start_server(model_dir, service_redis, p, lg) for p, lg in zip(ports, logs, strict=True)]
    try:
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for base, proc, lg in zip(bases, procs, logs, strict=True):
            wait_ready(base, proc, lg)
        with (
            httpx.Client(base_url=bases[0], timeout=10) as a,
            httpx.Client(base_url=bases[1], timeout=10) as b,
        ):
            gone = recommended(b, "u5")[0]  # b's best item for u5
            r = a.put("/items/availability", json={"items": [gone], "available": False})
            assert r.json() == {"items": 1, "changed": 1, "unavailable": 1}
            assert gone not in recommended(a, "u5")  # the writer's own answers at once
            wait_for(lambda: b.get("/items/unavailable").json()["items"] == [gone])
            asks: list[dict[str, Any]] = [{"user_id": u} for u in USERS]
            asks += [{"user_id": "cold"}, {"user_id": "x", "history": ["i3", "i4"], "explain": True}]
            for ask in asks:  # stored histories, the cold-start list, a request's own history
                items = recommended(b, **ask)
                assert gone not in items and len(items) == 39, ask
            r = b.put("/items/availability", json={"items": [gone], "available": True})
            assert r.json() == {"items": 1, "changed": 1, "unavailable": 0}
            wait_for(lambda: gone in recommended(a, "u5"))
            assert a.get("/items/unavailable").json() == {"items": []}
            assert metric(a.get("/metrics").text, "memrec_unavailable_items") == 0.0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


async def test_explanations_say_which_memories_name_an_unavailable_item(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", max_events_per_batch=5) as (
        _,
        client,
    ):
        ask = {"user_id": "reader", "history": ["i3", "i4", "i5"], "n": 40, "explain": True}
        before = (await client.post("/recommend", json=ask)).json()
        assert all(m["available"] for m in before["memories"])
        gone = before["memories"][0]["item_id"]
        r = await client.put("/items/availability", json={"items": [gone, gone], "available": False})
        assert r.json() == {"items": 1, "changed": 1, "unavailable": 1}
        after = (await client.post("/recommend", json=ask)).json()
        assert gone not in {it["item_id"] for it in after["items"]}
        flags = {m["memory_id"]: (m["item_id"], m["available"]) for m in after["memories"]}
        assert flags and all(available == (item != gone) for item, available in flags.values())
        assert any(not available for _, available in flags.values())
        assert (await client.get("/items/unavailable")).json() == {"items": [gone]}
        assert metric((await client.get("/metrics")).text, "memrec_unavailable_items") == 1.0
        # a new item (registered from an event) is marked by its external id and listed by it
        events = [{"user_id": "w", "item_id": i} for i in ("i1", "sku-z")]
        assert (await client.post("/interactions", json={"events": events})).status_code == 200
        await client.put("/items/availability", json={"items": ["sku-z"], "available": False})
        assert (await client.get("/items/unavailable")).json() == {"items": [gone, "sku-z"]}
        # bad requests change nothing
        r = await client.put("/items/availability", json={"items": ["i1", "nope", "zz"], "available": False})
        assert r.status_code == 422 and "'nope', 'zz' (2 unknown)" in r.json()["detail"]
        r = await client.put(
            "/items/availability", json={"items": [f"i{i}" for i in range(6)], "available": False}
        )
        assert r.status_code == 413 and "limit is 5" in r.json()["detail"]
        for body in ({"items": [], "available": False}, {"items": ["i1"]}, {"items": ["i1"], "available": 3}):
            assert (await client.put("/items/availability", json=body)).status_code == 422
        assert (await client.get("/items/unavailable")).json() == {"items": [gone, "sku-z"]}


async def test_availability_routes_need_the_key(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", api_key=KEY) as (_, client):
        body = {"items": ["i1"], "available": False}
        assert (await client.put("/items/availability", json=body)).status_code == 401
        assert (await client.get("/items/unavailable")).status_code == 401
        r = await client.put("/items/availability", json=body, headers={"X-API-Key": KEY})
        assert r.status_code == 200
        r = await client.get("/items/unavailable", headers={"Authorization": f"Bearer {KEY}"})
        assert r.json() == {"items": ["i1"]}


@pytest.mark.parametrize("available", [False, True])
async def test_the_answer_of_a_repeated_change(model_dir: Path, tmp_path: Path, available: bool) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (_, client):
        body = {"items": ["i2", "i3"], "available": available}
        expected = {"items": 2, "changed": 0 if available else 2, "unavailable": 0 if available else 2}
        assert (await client.put("/items/availability", json=body)).json() == expected
        again = (await client.put("/items/availability", json=body)).json()
        assert again == {**expected, "changed": 0}
