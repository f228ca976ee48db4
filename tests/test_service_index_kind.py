"""The index and retention settings reach the store, and the service answers through a compressed index."""

from __future__ import annotations

from pathlib import Path

from test_service_support import model_dir, running_app, toy_root  # noqa: F401

from service.app import store_config
from service.settings import Settings


def test_the_index_kind_and_age_settings_reach_the_store(model_dir: Path) -> None:  # noqa: F811
    config = store_config(
        Settings(model_dir=model_dir, index_kind="ivf_sq8", memory_max_age_days=0.5), 8, "v", 40
    )
    assert config.index.kind == "ivf_sq8" and config.max_age_s == 43_200
    default = store_config(Settings(model_dir=model_dir), 8, "v", 40)
    assert default.index.kind == "auto" and default.max_age_s is None  # ivf_sq8 from 1M memories


async def test_the_service_answers_through_an_sq8_index(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """A bank past the exact threshold in the SQ8 kind: ready, and a request is answered from it."""
    settings = {"model_dir": model_dir, "store_dir": tmp_path / "s", "snapshot_interval_s": 0}
    async with running_app(**settings, exact_threshold=50, index_kind="ivf_sq8") as (_, client):
        ready = (await client.get("/readyz")).json()
        assert ready["ready"] is True and "-sq8)" in str(ready)
        body = (
            await client.post("/recommend", json={"user_id": "sq8", "history": ["i3", "i4"], "n": 5})
        ).json()
        assert len(body["items"]) == 5 and body["k_used"] > 0
