"""The memory vote on the live bank: memories written through /interactions vote at once, so the very
next /recommend of a similar user ranks their next item up; with a frozen bank nothing moves."""

from __future__ import annotations

from pathlib import Path

from test_service_support import model_dir, running_app, toy_root, vote_model_dir  # noqa: F401

HISTORY = ["i3", "i4", "i5"]


async def _rank_after_others_chose(
    path: Path, store_dir: Path, frozen: bool
) -> tuple[int | None, int | None]:
    """Rank (0-based, None = beyond 40) of an unlikely item for a new user with HISTORY, before and
    after 20 other users went HISTORY → that item."""
    async with running_app(model_dir=path, store_dir=store_dir, frozen_memory=frozen) as (_, client):

        async def rank(item: str, who: str) -> int | None:
            req = {"user_id": who, "history": HISTORY, "n": 40}
            items = [it["item_id"] for it in (await client.post("/recommend", json=req)).json()["items"]]
            return items.index(item) if item in items else None

        first = (
            await client.post("/recommend", json={"user_id": "probe", "history": HISTORY, "n": 40})
        ).json()
        target = first["items"][-1]["item_id"]  # the model's least likely unseen item
        before = await rank(target, "probe-0")
        events = [
            {"user_id": f"trend-{j}", "item_id": item, "timestamp": 1.0 + t}
            for j in range(20)
            for t, item in enumerate([*HISTORY, target])
        ]
        r = await client.post("/interactions", json={"events": events})
        assert r.status_code == 200 and r.json()["accepted"] == len(events)
        return before, await rank(target, "probe-1")


async def test_fresh_memories_vote_on_the_next_request(vote_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    before, after = await _rank_after_others_chose(vote_model_dir, tmp_path / "live", frozen=False)
    assert before is not None and before > 20
    assert after == 0  # 20 memories of exactly this history, all naming the item, outvote the model


async def test_a_frozen_bank_does_not_move(vote_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    before, after = await _rank_after_others_chose(vote_model_dir, tmp_path / "frozen", frozen=True)
    assert before == after


async def test_the_fusion_alone_does_not_bring_it_up(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    # The same model without the vote: the fresh memories reach the score only through the fused
    # state, which on this model leaves the item where it was (the contrast that shows the vote acts).
    before, after = await _rank_after_others_chose(model_dir, tmp_path / "fusion", frozen=False)
    assert before is not None and after is not None and after > 20
