"""``MEMREC_CAPACITY`` through the service: the store keeps at most that many memories, the oldest go
first (the bank's, then the oldest live ones), and the API and the metrics show it. Once per backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from test_service_support import (  # noqa: F401  (fixtures)
    N_ITEMS,
    metric,
    model_dir,
    running_app,
    service_redis,
    toy_root,
)

from model import artifact

CAPACITY = 30
WRITERS = 20  # three events each: two memories per writer, 40 in all, past the capacity


def writer_items(j: int) -> list[str]:
    """Writer ``j``'s three items. The first items differ between writers, so every memory's prefix
    (``[a]`` or ``[a, b]``) is that writer's own and a reader with the same prefix finds it at cosine 1."""
    return [f"i{j}", f"i{(j + 11) % N_ITEMS}", f"i{(j + 23) % N_ITEMS}"]


async def explain(client: httpx.AsyncClient, history: list[str]) -> list[dict[str, Any]]:
    req = {"user_id": "reader", "history": history, "n": 5, "explain": True}
    body = (await client.post("/recommend", json=req)).json()
    assert body["strategy"] == "retrieval" and len(body["memories"]) == body["k_used"] >= 1, body
    memories: list[dict[str, Any]] = body["memories"]
    return memories


async def held(client: httpx.AsyncClient) -> tuple[float, float]:
    """The memory count and the index size, as a scrape of /metrics reports them."""
    text = (await client.get("/metrics")).text
    return metric(text, "memrec_memory_bank_size"), metric(text, "memrec_index_size")


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_capacity_keeps_the_newest_memories(
    backend: str,
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    bank = artifact.load(model_dir, "cpu").bank
    assert bank is not None and len(bank) > CAPACITY  # the bank alone overflows the capacity
    settings: dict[str, Any] = {"model_dir": model_dir, "store_dir": tmp_path / "s", "capacity": CAPACITY}
    if backend == "redis":  # asked for here only: the embedded case runs without Redis
        settings["redis_url"] = request.getfixturevalue("service_redis")

    async with running_app(**settings) as (app, client):
        assert await held(client) == (CAPACITY, CAPACITY)
        for j in range(WRITERS):
            events = [{"user_id": f"w{j}", "item_id": item} for item in writer_items(j)]
            assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 3
            assert (await app.state.runtime.store.stats()).memories == CAPACITY  # never more, at any step
        assert await held(client) == (CAPACITY, CAPACITY)

        # 40 live memories, 30 kept: the whole bank and writers 0-4 are gone, writers 5-19 remain.
        kept = {f"w{j}" for j in range(WRITERS - CAPACITY // 2, WRITERS)}
        for j in range(WRITERS):
            items = writer_items(j)
            memories = await explain(client, items[:2])
            assert {m["user_id"] for m in memories} <= kept, (j, memories)
            top = memories[0]
            if f"w{j}" in kept:  # its own memory of that prefix, found exactly
                assert (top["user_id"], top["item_id"], top["prefix_len"]) == (f"w{j}", items[2], 2)
                assert top["similarity"] == pytest.approx(1.0, abs=1e-4)
            else:
                assert top["similarity"] < 0.9999, (j, top)
        # Capacity bounds memories, not histories: an evicted writer's history is whole.
        vocab = app.state.runtime.vocab
        (history,) = await app.state.runtime.store.histories(["w0"], 10)
        assert [vocab.external_item(i) for i in history] == writer_items(0)

    # A restart does not reload the evicted bank rows over the newer memories.
    async with running_app(**settings) as (app, client):
        assert await held(client) == (CAPACITY, CAPACITY)
        memories = await explain(client, writer_items(WRITERS - 1)[:2])
        assert memories[0]["user_id"] == f"w{WRITERS - 1}"
        assert {m["user_id"] for m in memories} <= kept
