"""The users' encoder states on the request path (service.states): once a user's state is stored, a
/recommend without a request history runs no encoder pass and answers exactly as with one; a missing or
stale state is encoded again (and written back); a request history is always encoded; the bank's users
have their states from start-up; an erased user's state goes with them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from test_service_support import model_dir, running_app, service_redis, toy_root  # noqa: F401

from memory_store.states import StoredHistories

HISTORY = [f"i{i}" for i in (3, 4, 5, 6, 7, 8)]


@contextmanager
def counting_encodes(predictor: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Rows of every encoder pass the predictor runs inside the block."""
    passes: list[int] = []
    real = predictor.encode

    def encode(windows: Any) -> Any:
        passes.append(len(windows))
        return real(windows)

    monkeypatch.setattr(predictor, "encode", encode)
    yield passes
    monkeypatch.setattr(predictor, "encode", real)


def state_of(predictor: Any, history: list[int]) -> np.ndarray:
    """The state Predictor.prepare computes for ``history`` alone."""
    state: np.ndarray = predictor.encode([predictor.window(history)])[0]
    return state


def items_of(body: dict[str, Any]) -> list[tuple[str, float]]:
    return [(it["item_id"], it["score"]) for it in body["items"]]


async def recommend(client: Any, user: str, **extra: Any) -> dict[str, Any]:
    r = await client.post("/recommend", json={"user_id": user, "n": 10, **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def without_states(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the store's next reads return no state (as if none were kept)."""
    real = store.histories_with_states

    async def read(users: Any, max_len: int) -> StoredHistories:
        got = await real(users, max_len)
        return StoredHistories(got.histories, [None] * len(got.states))

    monkeypatch.setattr(store, "histories_with_states", read)


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_a_stored_state_saves_the_encoder_pass_and_changes_no_answer(
    backend: str,
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    redis_url = request.getfixturevalue("service_redis") if backend == "redis" else None
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", redis_url=redis_url) as (
        app,
        client,
    ):
        rt = app.state.runtime
        predictor = rt.pipeline.predictor
        events = [{"user_id": "new", "item_id": item} for item in HISTORY]
        assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 6
        # the state the ingest wrote is the one prepare computes (the same up to the last float bits:
        # they were encoded in different batches)
        stored = await rt.store.histories_with_states(["new"], 200)
        [state] = stored.states
        assert state is not None
        np.testing.assert_allclose(state, state_of(predictor, stored.histories[0]), rtol=0, atol=1e-6)

        with counting_encodes(predictor, monkeypatch) as passes:
            from_state = await recommend(client, "new", explain=True)
        assert passes == []  # no encoder pass
        assert from_state["strategy"] == "retrieval"

        with monkeypatch.context() as m:  # the same request with the history encoded
            await without_states(rt.store, m)
            with counting_encodes(predictor, monkeypatch) as passes:
                encoded = await recommend(client, "new", explain=True)
            assert passes == [1]
        assert [i for i, _ in items_of(encoded)] == [i for i, _ in items_of(from_state)]
        np.testing.assert_allclose(
            [s for _, s in items_of(encoded)], [s for _, s in items_of(from_state)], rtol=0, atol=1e-6
        )
        await rt.pipeline.write_back.drain()  # the encoded state was written back: read, bit for bit
        with counting_encodes(predictor, monkeypatch) as passes:
            again = await recommend(client, "new", explain=True)
        assert passes == []
        assert again == encoded  # exactly: the state is the one that request encoded

        # the next event's memory key is the stored state (the encoding of the history before it):
        # the pass encodes the new state alone
        [before] = (await rt.store.histories_with_states(["new"], 200)).states
        with counting_encodes(predictor, monkeypatch) as passes:
            r = await client.post("/interactions", json={"events": [{"user_id": "new", "item_id": "i9"}]})
        assert r.json()["accepted"] == 1 and passes == [1]
        hits = await rt.store.search(before[None, :], 50, with_keys=True)  # toy prefixes repeat: ties
        [col] = np.flatnonzero((hits.users[0] == "new") & (hits.prefix_lens[0] == len(HISTORY)))
        np.testing.assert_allclose(hits.keys[0, col], before / np.linalg.norm(before), rtol=0, atol=1e-6)


async def test_a_stale_or_missing_state_is_encoded_again_and_written_back(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    service_redis: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", redis_url=service_redis) as (
        app,
        client,
    ):
        rt = app.state.runtime
        predictor = rt.pipeline.predictor
        events = [{"user_id": "u", "item_id": item} for item in HISTORY]
        await client.post("/interactions", json={"events": events})
        prefix = f"memrec:{{{rt.store.config.namespace}}}:"
        r = redis.Redis.from_url(service_redis)
        try:
            # stale: another writer (an older replica) appended without dropping the state
            r.rpush(prefix + "hist:u", predictor.n_ids - 1)
            await stale_then_fresh(client, rt, predictor, monkeypatch, "u")
            # missing: gone from the store
            r.delete(prefix + "state:u")
            await stale_then_fresh(client, rt, predictor, monkeypatch, "u")
        finally:
            r.close()


async def stale_then_fresh(
    client: Any, rt: Any, predictor: Any, monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    """The next request encodes the user's history, answering as its encoding does; the one after
    reads the state written back."""
    (history,) = await rt.store.histories([user], 200)
    with counting_encodes(predictor, monkeypatch) as passes:
        first = await recommend(client, user)
    assert passes == [1]
    await rt.pipeline.write_back.drain()
    [state] = (await rt.store.histories_with_states([user], 200)).states
    np.testing.assert_array_equal(state, state_of(predictor, history[-50:]))
    with counting_encodes(predictor, monkeypatch) as passes:
        second = await recommend(client, user)
    assert passes == [] and second == first


async def test_a_request_history_is_always_encoded(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, client):
        predictor = app.state.runtime.pipeline.predictor
        events = [{"user_id": "u", "item_id": item} for item in HISTORY]
        await client.post("/interactions", json={"events": events})
        with counting_encodes(predictor, monkeypatch) as passes:
            await recommend(client, "u", history=["i9"])
        assert passes == [1]


async def test_known_users_have_their_states_from_start_up(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, client):
        rt = app.state.runtime
        users = rt.vocab.users[:20]
        read = await rt.store.histories_with_states(users, 200)
        assert all(h for h in read.histories) and all(s is not None for s in read.states)
        with counting_encodes(rt.pipeline.predictor, monkeypatch) as passes:
            for user in users:
                await recommend(client, user)
        assert passes == []
        # erased: the state goes with the history; the user is cold
        assert (await client.delete(f"/users/{users[0]}")).status_code == 200
        gone = await rt.store.histories_with_states([users[0]], 200)
        assert gone.histories == [[]] and gone.states == [None]
        assert (await recommend(client, users[0]))["strategy"] == "popular"


async def test_a_stored_state_skips_items_registered_after_training(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The encoder reads only the items it was trained on: the state kept for a history holding a new
    # item is the one prepare computes for it, and serves the next request without an encoder pass.
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s") as (app, client):
        rt = app.state.runtime
        predictor = rt.pipeline.predictor
        items = ["i3", "i4", "brand-new", "i5"]
        events = [{"user_id": "u", "item_id": item} for item in items]
        assert (await client.post("/interactions", json={"events": events})).json()["accepted"] == 4
        stored = await rt.store.histories_with_states(["u"], 200)
        [history], [state] = stored.histories, stored.states
        assert max(history) >= predictor.n_ids and state is not None  # the new item is in the history
        np.testing.assert_allclose(state, state_of(predictor, history), rtol=0, atol=1e-6)
        with counting_encodes(predictor, monkeypatch) as passes:
            await recommend(client, "u")
        assert passes == []
