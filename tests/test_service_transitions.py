"""The transition channel on the request path: live interactions move the next request's ranking at
once (frozen memory does not), and the channel changes the ranking it is mixed into."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_service_support import model_dir, running_app, toy_root, with_transitions  # noqa: F401

# The toy data's items mostly follow i → i+1, so i20 almost never follows i5 in the bank.
AFTER, NEW = "i5", "i20"


def rank_of(body: dict[str, object], item: str) -> int:
    items = [it["item_id"] for it in body["items"]]  # type: ignore[attr-defined]
    return items.index(item) if item in items else len(items)


@pytest.fixture(scope="session")
def transitions_dir(model_dir: Path, toy_root: Path) -> Path:  # noqa: F811
    return with_transitions(model_dir, toy_root / "transitions-live", 0.9)


@pytest.mark.parametrize("frozen", [False, True])
async def test_live_transitions_move_the_next_ranking(
    transitions_dir: Path, tmp_path: Path, frozen: bool
) -> None:
    settings = {"model_dir": transitions_dir, "store_dir": tmp_path / "s", "frozen_memory": frozen}
    async with running_app(**settings) as (_, client):
        ask = {"user_id": "asker", "history": [AFTER], "n": 40, "exclude_seen": True}
        before = (await client.post("/recommend", json=ask)).json()
        assert rank_of(before, NEW) >= 10
        # 60 new users go AFTER → NEW: each second event writes a memory whose prefix ends in AFTER
        events = [
            {"user_id": f"live{u}", "item_id": item, "event_id": f"live{u}-{item}"}
            for u in range(60)
            for item in (AFTER, NEW)
        ]
        res = (await client.post("/interactions", json={"events": events})).json()
        assert res == {"accepted": 120, "duplicates": 0}
        after = (await client.post("/recommend", json=ask)).json()
        if frozen:
            assert after["items"] == before["items"]
        else:
            assert rank_of(after, NEW) <= 2


async def test_the_channel_changes_the_ranking(
    model_dir: Path,  # noqa: F811
    transitions_dir: Path,
    tmp_path: Path,
) -> None:
    ask = {"user_id": "asker", "history": ["i3", "i4", "i5"], "n": 10}
    tops = []
    for path in (model_dir, transitions_dir):
        async with running_app(model_dir=path, store_dir=tmp_path / path.name) as (_, client):
            tops.append([it["item_id"] for it in (await client.post("/recommend", json=ask)).json()["items"]])
    assert tops[0] != tops[1]
    assert tops[1][0] == "i6"  # i5's usual follower leads once the transitions count
