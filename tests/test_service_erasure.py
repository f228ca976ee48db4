"""DELETE /users/{user_id} end to end: after it no answer derives from the user (other users'
explanations never list their memories, their transitions and votes lift nothing: the answers are
those of a store that never saw them), a repeat erases nothing, a restart from an older snapshot
replays it and the bank load never brings a bank user back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_service_support import (  # noqa: F401  (fixtures)
    metric,
    model_dir,
    running_app,
    service_redis,
    toy_root,
    with_transitions,
    with_vote,
)

GONE = "gone/user"  # an id with a '/', as the route allows
KEY = "k-erase-8c2e"
# The toy data's items mostly follow i → i+1, so i20 almost never follows i5 in the bank.
AFTER, NEW = "i5", "i20"


@pytest.fixture(scope="module")
def channels_dir(model_dir: Path, toy_root: Path) -> Path:  # noqa: F811
    """The vote and the transition channel on: the erased memories could reach an answer three ways."""
    return with_transitions(
        with_vote(model_dir, toy_root / "erasure-vote", 16), toy_root / "erasure-both", 0.9
    )


def items_of(body: dict[str, Any]) -> list[str]:
    return [it["item_id"] for it in body["items"]]


async def held_users(app: Any) -> set[str]:
    store = app.state.runtime.store
    res = await store.search(np.ones((1, store.dim), np.float32), (await store.stats()).index_size)
    return {str(u) for u in res.users[0]}


async def test_after_erasure_no_answer_derives_from_the_user(channels_dir: Path, tmp_path: Path) -> None:
    async with running_app(model_dir=channels_dir, store_dir=tmp_path / "s") as (app, client):
        asks = [
            {"user_id": "asker", "history": [AFTER], "n": 40, "explain": True},
            {"user_id": "asker", "history": [AFTER, NEW, AFTER], "n": 10, "explain": True},
            {"user_id": "u3", "n": 10, "explain": True},
        ]
        before = [(await client.post("/recommend", json=ask)).json() for ask in asks]
        # GONE goes AFTER → NEW sixty times: memories whose prefixes end in AFTER lead to NEW
        events = [
            {"user_id": GONE, "item_id": item, "event_id": f"g{j}-{item}"}
            for j in range(60)
            for item in (AFTER, NEW)
        ]
        assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 120
        lifted = (await client.post("/recommend", json=asks[0])).json()
        assert items_of(lifted).index(NEW) < items_of(before[0]).index(NEW)
        listed = (await client.post("/recommend", json=asks[1])).json()
        assert GONE in {m["user_id"] for m in listed["memories"]}

        r = await client.delete(f"/users/{GONE}")
        assert r.status_code == 200
        assert r.json() == {
            "user_id": GONE,
            "history_items": 120,
            "memories": 119,  # the first event only started the history
            "user_memories": 0,
            "event_ids": 120,
            "interactions": 120,
        }
        for ask, was in zip(asks, before, strict=True):  # as if GONE had never been
            now = (await client.post("/recommend", json=ask)).json()
            assert items_of(now) == items_of(was)
            assert [it["score"] for it in now["items"]] == pytest.approx([it["score"] for it in was["items"]])
            assert GONE not in {m["user_id"] for m in now["memories"]}
            assert now["memories"] == was["memories"]
        assert GONE not in await held_users(app)
        assert (await client.get(f"/users/{GONE}/history")).json()["items"] == []

        again = await client.delete(f"/users/{GONE}")
        assert again.status_code == 200
        assert again.json() == {
            "user_id": GONE,
            "history_items": 0,
            "memories": 0,
            "user_memories": 0,
            "event_ids": 0,
            "interactions": 0,
        }
        assert metric((await client.get("/metrics")).text, "memrec_user_erasures_total") == 2.0
        # their event ids are forgotten: the same events are new ones now
        assert (await client.post("/interactions", json={"events": events[:2]})).json()["accepted"] == 2


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_an_erased_bank_user_stays_erased_across_restarts(
    backend: str,
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    settings: dict[str, Any] = {"model_dir": model_dir, "store_dir": tmp_path / "s"}
    if backend == "redis":
        settings["redis_url"] = request.getfixturevalue("service_redis")
    async with running_app(**settings) as (app, _):  # loads the bank; snapshots at shutdown
        bank = (await app.state.runtime.store.stats()).memories
        assert "u3" in await held_users(app)
    # no snapshot at this one's shutdown: the next start reads the older snapshot and the log after it
    async with running_app(**settings, snapshot_interval_s=0) as (app, client):
        erased = (await client.delete("/users/u3")).json()
        assert erased["history_items"] > 0 and erased["memories"] > 0
    async with running_app(**settings) as (app, client):
        store = app.state.runtime.store
        assert await store.histories(["u3"], 10) == [[]]
        assert (await store.stats()).memories == bank - erased["memories"]  # the bank was not reloaded
        assert "u3" not in await held_users(app)
        assert "u3" not in (await client.get("/users/sample", params={"n": 50})).json()["users"]
        body = (await client.delete("/users/u3")).json()
        assert (body["history_items"], body["memories"]) == (0, 0)


async def test_erasure_needs_the_key_and_a_valid_id(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", api_key=KEY) as (app, client):
        assert (await client.delete("/users/u3")).status_code == 401
        assert (await app.state.runtime.store.histories(["u3"], 5))[0]  # nothing was erased
        headers = {"X-API-Key": KEY}
        assert (await client.delete("/users/" + "x" * 257, headers=headers)).status_code == 422
        r = await client.delete("/users/u3", headers=headers)
        assert r.status_code == 200 and r.json()["history_items"] > 0
