"""The optional API key: which routes need it, both ways of sending it, and that it never leaks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_service_support import model_dir, running_app, toy_root  # noqa: F401  (fixtures)

from service.auth import check_key
from service.settings import Settings

KEY = "k-3f9a1c77e2"


def test_check_key_cases() -> None:
    assert check_key(None, None, None)  # no key configured: open
    assert check_key(KEY, KEY, None) and check_key(KEY, None, KEY)
    assert not check_key(KEY, None, None)
    assert not check_key(KEY, KEY[:-1], None) and not check_key(KEY, KEY + "x", None)
    assert not check_key(KEY, "wrong", KEY)  # the header, when sent, is the one checked
    assert not check_key(KEY, "ключ", None)  # non-ASCII input is compared, not crashed on


@pytest.mark.parametrize("metrics_require_key", [False, True])
async def test_routes_need_the_key(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    metrics_require_key: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = {"api_key": KEY, "metrics_require_key": metrics_require_key}
    async with running_app(model_dir=model_dir, store_dir=tmp_path / "s", **settings) as (_, client):
        body = {"user_id": "u1", "n": 3}
        events = {"events": [{"user_id": "u1", "item_id": "i3", "event_id": "a1"}]}
        for path, payload in (("/recommend", body), ("/interactions", events)):
            r = await client.post(path, json=payload)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
            r = await client.post(path, json=payload, headers={"X-API-Key": "nope"})
            assert r.status_code == 401
            r = await client.post(path, json=payload, headers={"Authorization": "Basic " + KEY})
            assert r.status_code == 401  # only the bearer scheme carries the key
        # Nothing of the rejected interaction was stored: the same event id is new when authorised.
        r = await client.post("/interactions", json=events, headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}
        r = await client.post("/recommend", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        # Probes stay open; /metrics as configured.
        assert (await client.get("/livez")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == (401 if metrics_require_key else 200)
        assert (await client.get("/metrics", headers={"X-API-Key": KEY})).status_code == 200
        text = (await client.get("/metrics", headers={"X-API-Key": KEY})).text
        assert 'memrec_errors_total{kind="unauthorized"}' in text
        # The OpenAPI document declares both schemes, so clients and fuzzers can send the key.
        schemes = (await client.get("/openapi.json")).json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
    assert KEY not in caplog.text


def test_settings_never_show_secrets(model_dir: Path) -> None:  # noqa: F811
    s = Settings(model_dir=model_dir, api_key=KEY, redis_password="pw-77", redis_url="redis://x:6379/0")
    assert KEY not in repr(s) and "pw-77" not in repr(s) and KEY not in str(s.model_dump())


def test_model_directory_loads_without_unpickling(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A model directory is safetensors and JSON: loading it never runs an unpickler (which could
    execute code from a tampered file)."""
    import pickle

    import torch

    from model import artifact

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("unpickling while loading a model directory")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    art = artifact.load(model_dir, "cpu")
    assert art.bank is not None and art.fusion is not None
    assert {p.suffix for p in model_dir.iterdir() if p.is_file()} <= {".json", ".safetensors"}
