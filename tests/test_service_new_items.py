"""Item ids the model was not trained on (``MEMREC_NEW_ITEMS``): in ``accept`` mode /interactions
registers them (ids past the vocabulary, one per item across replicas) and stores their events in
histories, memories and transition counts like any other (as next items: the prefix items counted are
the known ones, as a query reads them); /recommend skips ids nobody registered and
answers with external ids both ways; in ``reject`` mode every unknown id is a 422 and nothing is stored.
How new items are scored is the predictor's (tests/test_model_catalogue.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import free_port
from pydantic import ValidationError
from test_service_support import (  # noqa: F401  (fixtures)
    N_ITEMS,
    model_dir,
    running_app,
    service_redis,
    start_server,
    toy_root,
    wait_ready,
    with_hybrid,
    with_transitions,
)

from service.settings import Settings

NEW = N_ITEMS + 1  # the toy vocabulary holds i0..i39: internal ids 1..40


async def stored_history(app: Any, user: str) -> list[int]:
    out: list[list[int]] = await app.state.runtime.store.histories([user], 200)
    return out[0]


async def held_items(app: Any, user: str) -> list[int]:
    """The next items of ``user``'s memories in the index (an exhaustive search)."""
    store = app.state.runtime.store
    res = await store.search(np.ones((1, store.dim), np.float32), (await store.stats()).index_size)
    return sorted(int(i) for i, u in zip(res.items[0], res.users[0], strict=True) if u == user)


async def test_reject_mode_answers_422_and_stores_nothing(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", new_items="reject") as (
        app,
        client,
    ):
        store = app.state.runtime.store
        before = (await store.stats()).memories
        events = [
            {"user_id": "w", "item_id": i, "event_id": f"w-{i}"} for i in ("i1", "sku-9", "i2", "sku-1")
        ]
        r = await client.post("/interactions", json={"events": events})
        assert r.status_code == 422 and "'sku-1', 'sku-9' (2 unknown)" in r.json()["detail"]
        assert await stored_history(app, "w") == [] and (await store.stats()).memories == before
        assert dict(await store.new_items()) == {}
        for field in ("history", "exclude_items"):
            r = await client.post("/recommend", json={"user_id": "u0", field: ["i1", "nope", "zzz"]})
            assert r.status_code == 422 and "'nope', 'zzz'" in r.text and field in r.text
        # nothing of the rejected batch was kept: the same event ids are new once the items are known
        events[1]["item_id"] = events[3]["item_id"] = "i5"
        assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 4


def counted(row: Any) -> dict[tuple[int, int], int]:
    """A follower row as {(next item, lag): count}."""
    return {(int(i), int(k)): int(c) for i, k, c in zip(row.items, row.lags, row.counts, strict=True)}


async def test_accept_mode_stores_new_items_like_any_other(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, client):
        store = app.state.runtime.store
        before = (await store.stats()).memories
        i3, i4 = app.state.runtime.vocab.item_ids(["i3", "i4"]).tolist()
        (bank_i3,) = await store.followers([i3])
        # i3 → sku-a → i4 → sku-b → sku-a: the histories and the memories' next items hold new ids
        sequence = ["i3", "sku-a", "i4", "sku-b", "sku-a"]
        events = [{"user_id": "w", "item_id": i, "event_id": f"w{j}"} for j, i in enumerate(sequence)]
        r = await client.post("/interactions", json={"events": events})
        assert r.json() == {"accepted": 5, "duplicates": 0}
        assert dict(await store.new_items()) == {"sku-a": NEW, "sku-b": NEW + 1}
        assert await stored_history(app, "w") == [i3, NEW, i4, NEW + 1, NEW]
        assert (await store.stats()).memories == before + 4  # the first event only starts the history
        assert await held_items(app, "w") == sorted([NEW, i4, NEW + 1, NEW])
        # transition counts name new items as followers; the prefix items counted are the known ones, as
        # a query's channel reads them: i4 after (i3, sku-a) counts i3 at lag 1, not 2
        after_i3, after_a, after_b = await store.followers([i3, NEW, NEW + 1])
        gained = Counter(counted(after_i3))
        gained.subtract(counted(bank_i3))
        assert +gained == {(NEW, 1): 1, (i4, 1): 1, (NEW + 1, 2): 1, (NEW, 2): 1}
        assert after_a.items.size == after_b.items.size == 0  # never a predecessor
        # answers speak external ids: the stored history as the page reads it
        shown = (await client.get("/users/w/history")).json()["items"]
        assert [it["item_id"] for it in shown] == sequence[::-1]
        # a second batch reuses the registered ids; an event whose history holds only new items gets no
        # memory (no item to encode a key from), only its place in the history
        more = [{"user_id": "v", "item_id": i} for i in ("sku-b", "sku-c", "i7", "i8")]
        assert (await client.post("/interactions", json={"events": more})).json()["accepted"] == 4
        i7, i8 = app.state.runtime.vocab.item_ids(["i7", "i8"]).tolist()
        assert await stored_history(app, "v") == [NEW + 1, NEW + 2, i7, i8]
        assert await held_items(app, "v") == [i8]  # after sku-b, sku-c, i7: i7 keys it
        assert (await store.stats()).new_items == 3


async def test_recommend_reads_registered_ids_and_skips_unknown_ones(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, client):
        events = [{"user_id": "w", "item_id": i} for i in ("i3", "sku-a", "i4")]
        assert (await client.post("/interactions", json={"events": events})).status_code == 200
        plain = {"user_id": "reader", "history": ["i3", "i4"], "n": 10}
        base = (await client.post("/recommend", json=plain)).json()
        # an id nobody registered is skipped in a read (never registered by it), wherever it is
        for extra in ({"history": ["i3", "never-seen", "i4"]}, {"exclude_items": ["never-seen"]}):
            r = await client.post("/recommend", json={**plain, **extra})
            assert r.status_code == 200 and r.json()["items"] == base["items"]
        assert "never-seen" not in await app.state.runtime.store.new_items()
        # registered new items are read: in a history (the answer does not fail) and in exclusions
        for extra in ({"history": ["i3", "sku-a", "i4"]}, {"exclude_items": ["sku-a"]}):
            r = await client.post("/recommend", json={**plain, **extra, "explain": True})
            assert r.status_code == 200, r.text
            assert "sku-a" not in {it["item_id"] for it in r.json()["items"]}  # seen, or excluded
        w = (await client.post("/recommend", json={"user_id": "w", "n": 5})).json()
        assert w["strategy"] == "retrieval" and len(w["items"]) == 5  # stored history with a new item


async def test_a_new_items_transition_counts_weigh_the_new_item_weight(
    model_dir: Path,  # noqa: F811
    toy_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two users went from i3 to a new item: its place in a reader's ranking after i3 rises with
    ``MEMREC_NEW_ITEM_WEIGHT``; a weight ≤ 0 is refused."""
    model = with_transitions(model_dir, toy_root / "new-items-weight")
    events = [
        {"user_id": f"fan{k}", "item_id": item, "event_id": f"fan{k}-{j}"}
        for k in range(2)
        for j, item in enumerate(("i7", "i3", "sku-w"))
    ]
    ranked: dict[float, list[str]] = {}
    for weight in (1.0, 50.0):
        async with running_app(
            model_dir=model, store_dir=tmp_path / f"w{weight:g}", new_item_weight=weight
        ) as (app, client):
            assert app.state.runtime.pipeline.predictor.new_item_weight == weight
            assert (await client.post("/interactions", json={"events": events})).status_code == 200
            body = {"user_id": "reader", "history": ["i1", "i3"], "n": 40}
            ranked[weight] = [
                it["item_id"] for it in (await client.post("/recommend", json=body)).json()["items"]
            ]
    light, heavy = ranked[1.0], ranked[50.0]
    assert heavy[0] == "sku-w" and light.index("sku-w") > 2  # fifth or so unweighted, first at 50
    for bad in (0.0, -1.0):
        with pytest.raises(ValidationError, match="new_item_weight"):
            Settings(model_dir=model, new_item_weight=bad)


async def test_new_items_get_derived_embeddings_where_nothing_else_ranks_them(
    model_dir: Path,  # noqa: F811
    toy_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``MEMREC_NEW_ITEM_EMBEDDINGS``: by default a model with the transition channel ranks a new item by
    the channel alone (the encoder and the fusion give it no probability), and ``on`` derives its
    embedding there too; a model with neither the channel nor the vote derives it (its only way to rank
    one), and ``off`` leaves it unranked."""
    channel = with_transitions(model_dir, toy_root / "new-items-weight")
    events = [
        {"user_id": f"fan{k}", "item_id": item, "event_id": f"fan{k}-{j}"}
        for k in range(2)
        for j, item in enumerate(("i7", "i3", "sku-w"))
    ]
    cases = {
        (channel, "auto"): False,
        (channel, "on"): True,
        (model_dir, "auto"): True,
        (model_dir, "off"): False,
    }
    for (model, mode), derived in cases.items():
        async with running_app(
            model_dir=model, store_dir=tmp_path / f"{model.name}-{mode}", new_item_embeddings=mode
        ) as (app, client):
            assert app.state.runtime.pipeline.new_items.derive is derived
            assert (await client.post("/interactions", json={"events": events})).status_code == 200
            body = {"user_id": "reader", "history": ["i1", "i3"], "n": 41, "explain": True}
            answer = (await client.post("/recommend", json=body)).json()["items"]
            why = {it["item_id"]: it["why"] for it in answer}
            if model == channel:  # ranked by its transitions either way; by the model only if derived
                assert why["sku-w"]["transitions"] > 0
                assert (why["sku-w"]["model"] > 0) is derived
            else:
                assert ("sku-w" in why) is derived


async def test_a_hybrid_model_ranks_a_new_item_by_its_transitions(
    model_dir: Path,  # noqa: F811
    toy_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The learned hybrid has no model probability for an item without an embedding: without derived
    embeddings its transitions alone rank it, as the channel's mixture does, and with none it stays
    out of every answer. By default (``auto``) a hybrid model derives them."""
    model = with_hybrid(model_dir, toy_root / "new-items-hybrid")
    async with running_app(model_dir=model, store_dir=tmp_path / "auto") as (app, _):
        assert app.state.runtime.pipeline.new_items.derive is True
    events = [
        {"user_id": f"fan{k}", "item_id": item, "event_id": f"fan{k}-{j}"}
        for k in range(12)
        for j, item in enumerate((f"i{k % 3 + 5}", "i3", "sku-h"))
    ]
    async with running_app(model_dir=model, store_dir=tmp_path / "s", new_item_embeddings="off") as (
        app,
        client,
    ):
        assert app.state.runtime.pipeline.new_items.derive is False
        assert (await client.post("/interactions", json={"events": events})).status_code == 200
        after_i3 = {"user_id": "reader", "history": ["i1", "i3"], "n": 10}
        items = [it["item_id"] for it in (await client.post("/recommend", json=after_i3)).json()["items"]]
        assert "sku-h" in items
        elsewhere = {"user_id": "other", "history": ["i30", "i31"], "n": 41}
        items = [it["item_id"] for it in (await client.post("/recommend", json=elsewhere)).json()["items"]]
        assert "sku-h" not in items and len(items) == 38  # every unseen known item, none without evidence


async def test_replicas_agree_on_new_item_ids(
    model_dir: Path,  # noqa: F811
    service_redis: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two apps on one Redis registering the same new items at once get one id per item, and each
    answers with the external id of an item the other registered."""
    common = {"model_dir": model_dir, "redis_url": service_redis}
    async with (
        running_app(**common, store_dir=tmp_path / "a") as (app_a, a),
        running_app(**common, store_dir=tmp_path / "b") as (app_b, b),
    ):

        async def send(client: httpx.AsyncClient, user: str) -> None:
            events = [{"user_id": user, "item_id": i} for i in ("i3", *(f"sku-{j}" for j in range(20)))]
            r = await client.post("/interactions", json={"events": events})
            assert r.status_code == 200, r.text

        await asyncio.gather(*(send(c, f"{name}{k}") for k in range(3) for c, name in ((a, "a"), (b, "b"))))
        registry = dict(await app_a.state.runtime.store.new_items())
        assert sorted(registry.values()) == list(range(NEW, NEW + 20))
        for _ in range(100):  # b applies a's registrations from the log
            if dict(await app_b.state.runtime.store.new_items()) == registry:
                break
            await asyncio.sleep(0.02)
        assert dict(await app_b.state.runtime.store.new_items()) == registry
        for client in (a, b):
            for user in ("a0", "b2"):
                shown = (await client.get(f"/users/{user}/history")).json()["items"]
                assert [it["item_id"] for it in shown][:2] == ["sku-19", "sku-18"]


def serve(model: Path, redis_url: str, ports: list[int], logs: list[Path]) -> list[Any]:
    """``memrec serve`` replicas on one Redis, each ready."""
    procs = [start_server(model, redis_url, p, lg) for p, lg in zip(ports, logs, strict=True)]
    for p, proc, lg in zip(ports, procs, logs, strict=True):
        wait_ready(f"http://127.0.0.1:{p}", proc, lg)
    return procs


def stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def recommended(port: int, user: str, history: list[str] | None = None) -> list[str]:
    body: dict[str, Any] = {"user_id": user, "n": 10, **({"history": history} if history else {})}
    r = httpx.post(f"http://127.0.0.1:{port}/recommend", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return [it["item_id"] for it in r.json()["items"]]


def test_a_new_item_is_recommended_where_it_follows_on_every_replica_and_after_a_restart(
    model_dir: Path,  # noqa: F811
    toy_root: Path,  # noqa: F811
    service_redis: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Users go from i3 to an item the model never saw: another user whose last item is i3 gets it
    recommended, from the replica that took the events and from another one, and after both restart."""
    model = with_transitions(model_dir, toy_root / "new-items-transitions")
    ports, logs = [free_port(), free_port()], [tmp_path / f"replica{i}.log" for i in range(2)]
    procs = serve(model, service_redis, ports, logs)
    try:
        assert "sku-new" not in recommended(ports[1], "reader", ["i1", "i3"])
        events = [
            {"user_id": f"fan{k}", "item_id": item, "event_id": f"fan{k}-{j}"}
            for k in range(12)
            for j, item in enumerate((f"i{k % 3 + 5}", "i3", "sku-new"))
        ]
        r = httpx.post(f"http://127.0.0.1:{ports[0]}/interactions", json={"events": events}, timeout=30)
        assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text
        for port in ports:  # the writer at once; the other replica once it has applied the log
            deadline = time.monotonic() + 10
            while "sku-new" not in recommended(port, "reader", ["i1", "i3"]):
                assert time.monotonic() < deadline, f"replica on {port} never recommends the new item"
                time.sleep(0.05)
        stop(procs)
        procs = serve(model, service_redis, ports, logs)
        for port in ports:
            assert "sku-new" in recommended(port, "reader", ["i1", "i3"])
            assert "sku-new" not in recommended(port, "fan0")  # seen items are never recommended
    finally:
        stop(procs)
