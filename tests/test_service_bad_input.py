"""Explicit bad and odd input against the app on the Redis backend (database 11): each case gets a
clear answer, a 4xx says what was wrong, and nothing of a rejected request is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_service_support import model_dir, running_app, service_redis, toy_root  # noqa: F401


@pytest.fixture
async def api(
    model_dir: Path,  # noqa: F811
    service_redis: str,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    async with running_app(model_dir=model_dir, redis_url=service_redis, store_dir=tmp_path / "s") as pair:
        yield pair


async def _history(app: Any, user: str) -> list[str]:
    rt = app.state.runtime
    return [rt.vocab.external_item(i) for i in (await rt.store.histories([user], 100))[0]]


async def test_odd_but_valid_requests_are_answered(api: tuple[Any, httpx.AsyncClient]) -> None:
    app, client = api
    # An unknown user with no history: the documented cold start (popular items).
    body = (await client.post("/recommend", json={"user_id": "never-seen", "n": 5})).json()
    assert body["strategy"] == "popular" and len(body["items"]) == 5 and body["k_used"] == 0
    # An empty history is no history.
    assert (await client.post("/recommend", json={"user_id": "never-seen", "history": []})).json()[
        "strategy"
    ] == "popular"
    # A history at the length cap is accepted (the encoder reads its last 50 items).
    long = [f"i{j % 40}" for j in range(1000)]
    r = await client.post("/recommend", json={"user_id": "x", "history": long, "n": 3, "exclude_seen": False})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    # n larger than the unseen catalogue: every item not excluded, once.
    r = await client.post("/recommend", json={"user_id": "x", "history": ["i1"], "n": 1000})
    items = [it["item_id"] for it in r.json()["items"]]
    assert r.status_code == 200 and len(items) == len(set(items)) == 39 and "i1" not in items
    # Unicode user ids round-trip through the store.
    user = "ユーザー🎉 naïve"
    events = [{"user_id": user, "item_id": i, "event_id": f"u-{i}"} for i in ("i3", "i4")]
    assert (await client.post("/interactions", json={"events": events})).json() == {
        "accepted": 2,
        "duplicates": 0,
    }
    assert await _history(app, user) == ["i3", "i4"]
    assert (await client.post("/recommend", json={"user_id": user})).json()["user_id"] == user


async def test_duplicates_and_timestamps_in_one_batch(api: tuple[Any, httpx.AsyncClient]) -> None:
    app, client = api
    events = [
        {"user_id": "t", "item_id": "i5", "event_id": "a", "timestamp": 300.0},
        {"user_id": "t", "item_id": "i6", "event_id": "b", "timestamp": 100.0},  # out of order
        {"user_id": "t", "item_id": "i7", "event_id": "c", "timestamp": 100.0},  # same timestamp
        {"user_id": "t", "item_id": "i5", "event_id": "a", "timestamp": 300.0},  # the same event again
    ]
    r = await client.post("/interactions", json={"events": events})
    assert r.json() == {"accepted": 3, "duplicates": 1}
    # Histories keep arrival order (the order a client sends is the order it observed).
    assert await _history(app, "t") == ["i5", "i6", "i7"]


BAD_RECOMMEND = [
    ({"user_id": "u0", "n": -5}, 422, "greater than or equal to 1"),
    ({"user_id": "u0", "n": 10**30}, 422, "less than or equal to 1000"),
    ({"user_id": "u0", "n": "ten"}, 422, "valid integer"),
    ({"user_id": "u" * 257}, 422, "at most 256 characters"),
    ({"user_id": "u0", "history": ["i1"] * 1001}, 422, "the limit is 1000"),
    ({"user_id": "u0", "history": ["i1", None]}, 422, "valid string"),
    ({"user_id": ["u0"]}, 422, "valid string"),
]


@pytest.mark.parametrize(("payload", "status", "needle"), BAD_RECOMMEND)
async def test_bad_recommend_requests(
    api: tuple[Any, httpx.AsyncClient], payload: dict[str, Any], status: int, needle: str
) -> None:
    _, client = api
    r = await client.post("/recommend", json=payload)
    assert r.status_code == status and needle in r.text


async def test_bad_bodies_and_content_types(api: tuple[Any, httpx.AsyncClient]) -> None:
    app, client = api
    before = (await app.state.runtime.store.stats()).memories
    ok = b'{"events": [{"user_id": "w", "item_id": "i1"}]}'
    raw_cases: list[tuple[bytes, str, int, str]] = [
        (ok, "text/plain", 422, "detail"),
        (b"user_id=w&item_id=i1", "application/x-www-form-urlencoded", 422, "detail"),
        (b"", "application/json", 422, "detail"),
        (b'{"events": [', "application/json", 422, "JSON decode error"),
        (
            b'{"events": [{"user_id": "w", "item_id": "i1", "timestamp": NaN}]}',
            "application/json",
            422,
            "finite",
        ),
        (
            b'{"events": [{"user_id": "w", "item_id": "i1", "timestamp": 1e400}]}',
            "application/json",
            422,
            "finite",
        ),
        (b'{"events": [{"user_id": "\\udc80", "item_id": "i1"}]}', "application/json", 422, "unicode"),
        (
            b'{"events": [{"user_id": "w", "item_id": "' + b"z" * 5000 + b'"}]}',
            "application/json",
            422,
            "256",
        ),
        (
            b'{"events": [{"user_id": "w", "item_id": "i1", "event_id": ""}]}',
            "application/json",
            422,
            "at least 1",
        ),
    ]
    for content, ctype, status, needle in raw_cases:
        r = await client.post("/interactions", content=content, headers={"content-type": ctype})
        assert r.status_code == status, (content[:60], r.text)
        assert r.json()["detail"] and needle in r.text, (content[:60], r.text)

    # A body over the limit is refused while it streams in, with or without a declared length.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 50_000

    r = await client.post("/interactions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert await _history(app, "w") == []
    assert (await app.state.runtime.store.stats()).memories == before


async def test_exclude_seen_covers_more_than_the_encoder_window(api: tuple[Any, httpx.AsyncClient]) -> None:
    """A user with 60 events (each of the 40 items once, then 20 repeats of the last) never gets a seen
    item back, not even those older than the 50 items the encoder reads."""
    app, client = api
    items = [f"i{j}" for j in range(40)]
    events = [{"user_id": "heavy", "item_id": it, "event_id": f"h{k}"} for k, it in enumerate(items)]
    assert (await client.post("/interactions", json={"events": events})).status_code == 200
    more = [{"user_id": "heavy", "item_id": "i39", "event_id": f"h-more{k}"} for k in range(20)]
    assert (await client.post("/interactions", json={"events": more})).status_code == 200
    assert len(await _history(app, "heavy")) == 60
    # Items i0..i9 are outside the last 50 (which are i10..i39 then 20 × i39), yet still masked.
    r = await client.post("/recommend", json={"user_id": "heavy", "n": 40})
    assert r.status_code == 200 and r.json()["items"] == []
