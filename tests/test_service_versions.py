"""Two model versions side by side (``MEMREC_MODEL_DIR_B``, ``MEMREC_SHARE_B``): a deterministic split of
the users by a hash of their id, every write reaching both versions, answers and metrics named by version,
online hits counted per version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_service_support import (  # noqa: F401  (fixtures)
    metric,
    model_dir,
    running_app,
    toy_root,
    train_toy_model,
)

from service.settings import Settings
from service.versions import bucket, in_share


@pytest.fixture(scope="session")
def model_dir_b(toy_root: Path) -> Path:  # noqa: F811
    """A second model of the same data, another encoder seed: another model version."""
    return train_toy_model(toy_root, "model-seed1", "--seed", "1")


def test_the_split_is_uniform_and_the_same_in_every_process() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    share = sum(in_share(u, 0.3) for u in users) / len(users)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(users)) ** 0.5  # within sampling error
    assert not any(in_share(u, 0.0) for u in users[:1000]) and all(in_share(u, 1.0) for u in users[:1000])
    # nested shares: raising the share only moves users to the second version
    assert all(in_share(u, 0.5) for u in users if in_share(u, 0.2))
    # not Python's salted hash: another interpreter with another hash seed puts users in the same place
    code = "from service.versions import bucket; print(repr([bucket(f'user-{i}') for i in range(50)]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr([bucket(f"user-{i}") for i in range(50)])


def test_settings_refuse_a_share_without_a_second_model(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ValidationError, match="share_b > 0 needs model_dir_b"):
        Settings(model_dir=model_dir, share_b=0.5)
    with pytest.raises(ValidationError, match="model_dir_b .* holds no config.json"):
        Settings(model_dir=model_dir, model_dir_b=tmp_path)
    with pytest.raises(ValidationError):
        Settings(model_dir=model_dir, model_dir_b=model_dir, share_b=1.5)


async def test_the_same_model_twice_is_refused(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(RuntimeError, match="same model version"):
        async with running_app(model_dir=model_dir, model_dir_b=model_dir, store_dir=tmp_path / "s"):
            pass


async def test_two_versions_split_users_and_both_see_every_write(
    model_dir: Path,  # noqa: F811
    model_dir_b: Path,
    tmp_path: Path,
) -> None:
    async with running_app(
        model_dir=model_dir, model_dir_b=model_dir_b, share_b=0.5, store_dir=tmp_path / "s"
    ) as (app, client):
        versions = app.state.versions
        a, b = versions.primary, versions.secondary
        assert a.model_version != b.model_version and a.store is not b.store

        ready = (await client.get("/readyz")).json()
        assert ready["ready"] and ready["model_versions"] == [a.model_version, b.model_version]
        assert ready["checks"]["store_b"] == "ok"

        # every user always gets the version of their hash, request after request
        users = [f"w{i}" for i in range(40)]
        for _ in range(2):
            for user in users:
                r = await client.post("/recommend", json={"user_id": user, "history": ["i1", "i2"]})
                assert r.status_code == 200
                want = b.model_version if in_share(user, 0.5) else a.model_version
                assert r.json()["model_version"] == want
        served_b = sum(in_share(u, 0.5) for u in users)
        assert 0 < served_b < len(users)

        # an interaction reaches both versions' histories and memories, new items included
        before = [(await rt.store.stats()).memories for rt in (a, b)]
        events = [
            {"user_id": "w0", "item_id": item, "event_id": f"w0-{n}"}
            for n, item in enumerate(["i3", "i4", "sku-new", "i5"])
        ]
        r = await client.post("/interactions", json={"events": events})
        assert r.json() == {"accepted": 4, "duplicates": 0}
        for rt, n0 in zip((a, b), before, strict=True):
            (history,) = await rt.store.histories(["w0"], 10)
            names = await rt.items.names()
            assert [names.external(i) for i in history] == ["i3", "i4", "sku-new", "i5"]
            assert (await rt.store.stats()).memories > n0
        r = await client.post("/interactions", json={"events": events})  # a retry: duplicates in both
        assert r.json() == {"accepted": 0, "duplicates": 4}

        # metrics carry the version: answers, latency
        text = (await client.get("/metrics")).text
        for rt, count in ((a, 2 * (len(users) - served_b)), (b, 2 * served_b)):
            label = f'version="{rt.model_version}"'
            answers = metric(text, f'memrec_recommendations_total{{strategy="retrieval",{label}}}')
            assert answers == count
            assert metric(text, f"memrec_recommend_duration_seconds_count{{{label}}}") == count

        # erasure reaches both
        assert (await client.delete("/users/w0")).status_code == 200
        for rt in (a, b):
            assert await rt.store.histories(["w0"], 10) == [[]]


async def test_outcomes_count_hits_and_misses_per_version(
    model_dir: Path,  # noqa: F811
    model_dir_b: Path,
    tmp_path: Path,
) -> None:
    async with running_app(
        model_dir=model_dir, model_dir_b=model_dir_b, share_b=0.5, store_dir=tmp_path / "s"
    ) as (app, client):
        user_a = next(u for u in (f"o{i}" for i in range(100)) if not in_share(u, 0.5))
        user_b = next(u for u in (f"o{i}" for i in range(100)) if in_share(u, 0.5))
        shown = {}
        for user in (user_a, user_b):
            r = await client.post("/recommend", json={"user_id": user, "history": ["i7"], "n": 5})
            shown[user] = [it["item_id"] for it in r.json()["items"]]
        unseen = next(f"i{i}" for i in range(40) if f"i{i}" not in shown[user_a])
        steps = [(user_a, shown[user_a][0]), (user_a, unseen), (user_b, shown[user_b][1])]
        for n, (user, item) in enumerate(steps):
            body = {"events": [{"user_id": user, "item_id": item, "event_id": f"o-{n}"}]}
            assert (await client.post("/interactions", json=body)).status_code == 200
        # an interaction of a user no answer was given to counts nowhere
        body = {"events": [{"user_id": "nobody", "item_id": "i1", "event_id": "o-x"}]}
        assert (await client.post("/interactions", json=body)).status_code == 200
        text = (await client.get("/metrics")).text
        va, vb = app.state.versions.primary.model_version, app.state.versions.secondary.model_version
        name = "memrec_recommendation_outcomes_total"
        assert metric(text, f'{name}{{outcome="hit",version="{va}"}}') == 1
        assert metric(text, f'{name}{{outcome="miss",version="{va}"}}') == 1
        assert metric(text, f'{name}{{outcome="hit",version="{vb}"}}') == 1


async def test_reject_mode_stores_nothing_in_either_version(
    model_dir: Path,  # noqa: F811
    model_dir_b: Path,
    tmp_path: Path,
) -> None:
    async with running_app(
        model_dir=model_dir,
        model_dir_b=model_dir_b,
        share_b=0.5,
        store_dir=tmp_path / "s",
        new_items="reject",
    ) as (app, client):
        events = [{"user_id": "r", "item_id": i, "event_id": f"r-{i}"} for i in ("i1", "sku-9")]
        r = await client.post("/interactions", json={"events": events})
        assert r.status_code == 422 and "sku-9" in r.json()["detail"]
        for rt in app.state.versions.runtimes:
            assert await rt.store.histories(["r"], 10) == [[]]
