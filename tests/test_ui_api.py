"""The page at /ui and what it reads (/ui/info, /users/sample, /users/{id}/history, /items/titles), the
item titles, the explanation schema, and the API docs served without any other site."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from test_service_support import N_ITEMS, model_dir, running_app, toy_root  # noqa: F401  (fixtures)

from service.routes.ui import ModelFacts
from service.server import page_address
from service.titles import find_titles_file, load_titles, parse_recbole_item, parse_u_item, read_titles

KEY = "ui-key-5b21"
SHARED_ML100K = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ASSET_REF = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def toy_titles(folder: Path) -> Path:
    """A RecBole .item file naming the toy items, laid out as <folder>/toy/toy.item."""
    path = folder / "toy" / "toy.item"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"i{i}\tToy film {i}\t{1990 + i}" for i in range(N_ITEMS)]
    path.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\n" + "\n".join(rows) + "\n")
    return path


def store(tmp_path: Path) -> dict[str, object]:
    return {"store_dir": tmp_path / "store", "data_dir": None, "snapshot_interval_s": 0}


# -------------------------------------------------------------------------------------- the page


async def test_root_redirects_to_the_page_which_loads_only_its_own_files(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with running_app(model_dir=model_dir, **store(tmp_path)) as (_, client):
        root = await client.get("/")
        assert root.status_code == 307 and root.headers["location"] == "/ui"
        page = await client.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        refs = ASSET_REF.findall(page.text)
        assert "ui/static/ui.js" in refs and "ui/static/ui.css" in refs
        for ref in refs:  # relative (so the page works behind a path prefix) and local: no CDN
            assert not re.match(r"^(?:[a-z]+:)?//", ref), ref
            if ref.startswith("ui/static/"):
                asset = await client.get(f"/{ref}")
                assert asset.status_code == 200 and asset.content, ref
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        js = (await client.get("/ui/static/ui.js")).text
        assert "http://" not in js and "https://" not in js
        assert "X-API-Key" in js  # the key typed in the page travels as the API expects it


async def test_info_says_model_k_store_and_links(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, **store(tmp_path)) as (_, client):
        info = (await client.get("/ui/info")).json()
        ready = (await client.get("/readyz")).json()
        assert info["model_version"] == ready["model_version"]
        assert info["dataset"] == "toy" and info["retrieval"] is True and info["k"] == 5  # --k 5
        assert info["vote"] is False and info["transitions"] is False
        assert info["store_backend"] == "embedded" and info["memories"] > 0
        assert info["known_users"] == 120 and info["titles"] == 0
        assert (info["docs_url"], info["metrics_url"]) == ("docs", "metrics")
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_users_sample_and_history_most_recent_first(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, **store(tmp_path)) as (_, client):
        users = (await client.get("/users/sample", params={"n": 4})).json()["users"]
        assert len(users) == len(set(users)) == 4 and all(re.fullmatch(r"u\d+", u) for u in users)
        user = users[0]
        before = (await client.get(f"/users/{user}/history")).json()
        assert before["user_id"] == user and before["items"]
        assert all(item["title"] is None for item in before["items"])  # no titles file
        r = await client.post("/interactions", json={"events": [{"user_id": user, "item_id": "i39"}]})
        assert r.status_code == 200
        after = (await client.get(f"/users/{user}/history")).json()["items"]
        assert after[0]["item_id"] == "i39" and after[1:] == before["items"][: len(after) - 1]
        short = (await client.get(f"/users/{user}/history", params={"n": 2})).json()["items"]
        assert short == after[:2]
        assert (await client.get("/users/nobody-yet/history")).json()["items"] == []
        await client.post("/interactions", json={"events": [{"user_id": "a/b c", "item_id": "i2"}]})
        odd = (await client.get("/users/a%2Fb%20c/history")).json()
        assert odd == {"user_id": "a/b c", "items": [{"item_id": "i2", "title": None}]}
        assert (await client.get("/users/sample", params={"n": 0})).status_code == 422
        assert (await client.get(f"/users/{user}/history", params={"n": 0})).status_code == 422


async def test_titles_come_from_the_data_folder_or_the_named_file(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    toy_titles(data)
    settings = {**store(tmp_path), "data_dir": data}
    async with running_app(model_dir=model_dir, **settings) as (_, client):
        assert (await client.get("/ui/info")).json()["titles"] == N_ITEMS
        r = await client.get("/items/titles", params={"ids": ["i3", "i7", "not-an-item"]})
        assert r.json() == {"titles": {"i3": "Toy film 3 (1993)", "i7": "Toy film 7 (1997)"}}
        user = (await client.get("/users/sample", params={"n": 1})).json()["users"][0]
        items = (await client.get(f"/users/{user}/history")).json()["items"]
        for item in items:
            number = int(item["item_id"][1:])
            assert item["title"] == f"Toy film {number} ({1990 + number})"
    u_item = tmp_path / "u.item"  # MovieLens' own format, latin-1; the named file wins over data_dir
    u_item.write_bytes("i3|Les Misérables (1995)|01-Jan-1995||http://x|0|1\n".encode("latin-1"))
    async with running_app(model_dir=model_dir, **{**settings, "item_titles": u_item}) as (_, client):
        r = await client.get("/items/titles", params={"ids": ["i3", "i4"]})
        assert r.json() == {"titles": {"i3": "Les Misérables (1995)"}}


def test_title_files_are_parsed_and_bad_ones_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert parse_u_item("1|Toy Story (1995)|01-Jan-1995\n\n2||x\n") == {"1": "Toy Story (1995)"}
    text = "item_id:token\tclass:token_seq\tmovie_title:token_seq\n5\tDrama\tHeat\n6\tDrama\n"
    assert parse_recbole_item(text) == {"5": "Heat"}
    with pytest.raises(ValueError, match="names no item_id"):
        parse_recbole_item("id:token\tname:token\n1\tx\n")
    bad = tmp_path / "bad.item"
    bad.write_text("user_id:token\tage:token\n1\t20\n")
    assert load_titles(bad, None, "toy") == {} and "item titles not read" in caplog.text
    assert load_titles(tmp_path / "missing.item", None, "toy") == {}
    assert load_titles(None, tmp_path, "toy") == {} and load_titles(None, None, "toy") == {}
    assert find_titles_file(tmp_path, "toy") is None
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "u.item").write_text("1|A|\n")
    assert find_titles_file(tmp_path, "toy") == tmp_path / "toy" / "u.item"


def test_the_shared_ml100k_item_file_gives_titles_with_years() -> None:
    data = Path(os.environ.get("MEMREC_DATA_DIR", SHARED_ML100K))
    path = find_titles_file(data, "ml-100k")
    if path is None:
        pytest.skip(f"no ml-100k item file under {data}")
    titles = read_titles(path)
    assert len(titles) == 1682 and titles["1"] == "Toy Story (1995)"


def test_model_facts_read_the_inference_config_or_an_older_fine_tune_config(tmp_path: Path) -> None:
    assert ModelFacts.from_config({}) == ModelFacts() and ModelFacts.read(tmp_path) == ModelFacts()
    inference = {"k": 20, "vote": {"weight": 0.3, "depth": 8}, "transitions": {"weight": 0.0}}
    assert ModelFacts.from_config({"dataset": "d", "fusion": {}}, inference) == ModelFacts(
        "d", True, 20, True
    )
    legacy = {"dataset": "d", "fusion": {}, "finetune": {"k": 7, "transition_weight": 0.5}}
    assert ModelFacts.from_config(legacy) == ModelFacts("d", True, 7, False, True)
    assert ModelFacts.from_config({"dataset": "d"}, inference) == ModelFacts("d")  # no fusion: encoder only
    (tmp_path / "config.json").write_text('{"dataset": "d", "fusion": {}}')
    (tmp_path / "inference.json").write_text('{"k": -1}')  # refused by the model's own load
    assert ModelFacts.read(tmp_path) == ModelFacts()


def test_page_address_is_reachable_from_this_machine() -> None:
    assert page_address("127.0.0.1", 8000) == "http://127.0.0.1:8000/ui"
    assert page_address("0.0.0.0", 80) == "http://127.0.0.1:80/ui"
    assert page_address("::1", 8000) == "http://[::1]:8000/ui"
    assert page_address("::", 8000) == "http://[::1]:8000/ui"


# ------------------------------------------------------------------------------------------ the key


async def test_the_page_is_open_its_data_needs_the_key(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, api_key=KEY, **store(tmp_path)) as (_, client):
        for open_path in ("/ui", "/ui/static/ui.js", "/ui/static/ui.css", "/docs", "/redoc", "/openapi.json"):
            assert (await client.get(open_path)).status_code == 200, open_path
        keyed = ("/ui/info", "/users/sample", "/users/u1/history", "/items/titles?ids=i1")
        for path in keyed:
            r = await client.get(path)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"], path
            assert (await client.get(path, headers={"X-API-Key": KEY})).status_code == 200, path
        operations = (await client.get("/openapi.json")).json()["paths"]
        for path in ("/ui/info", "/users/sample", "/users/{user_id}/history", "/items/titles"):
            assert operations[path]["get"]["security"], path
        assert "/ui" not in operations and "/" not in operations  # the page is not part of the API


# ---------------------------------------------------------------------------------- explanations


async def test_explanation_schema_is_documented(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, **store(tmp_path)) as (_, client):
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        why = schemas["ItemWhy"]
        fields = {"encoder_rank", "model", "vote", "transitions", "memories", "follows"}
        assert set(why["properties"]) == fields and set(why["required"]) == fields
        assert all(why["properties"][f].get("description") for f in fields)
        assert why["properties"]["encoder_rank"]["minimum"] == 1
        follow = schemas["FollowOut"]["properties"]
        assert set(follow) == {"item_id", "weight"} and all(p.get("description") for p in follow.values())
        scored = schemas["ScoredItem"]
        assert "why" in scored["properties"] and "why" not in scored.get("required", [])
        # Without explain no item carries a why; with it, a why (once filled) adds up as documented.
        plain = (await client.post("/recommend", json={"user_id": "u1", "n": 5})).json()
        assert all("why" not in item for item in plain["items"])
        explained = (await client.post("/recommend", json={"user_id": "u1", "n": 5, "explain": True})).json()
        ids = {m["memory_id"] for m in explained["memories"]}
        for item in explained["items"]:
            if "why" in item:
                w = item["why"]
                assert w["encoder_rank"] >= 1 and set(w["memories"]) <= ids
                assert w["vote"] == w["transitions"] == 0 and 0 < w["model"] <= 1  # both channels off


# ------------------------------------------------------------------------------------- offline docs


async def test_docs_load_only_local_files(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    async with running_app(model_dir=model_dir, **store(tmp_path)) as (_, client):
        for page, needed in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc",))):
            r = await client.get(page)
            assert r.status_code == 200 and "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
            assert "img-src 'self' data:" in r.headers["content-security-policy"]  # ReDoc's CDN logo
            refs = ASSET_REF.findall(r.text)
            for name in needed:
                assert any(name in ref for ref in refs), (page, refs)
            for ref in refs:
                assert ref.startswith("/"), ref  # served by this app
                asset = await client.get(ref)
                assert asset.status_code == 200 and len(asset.content) > 0, ref
        js = await client.get("/docs/assets/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"] and len(js.content) > 500_000
        css = await client.get("/docs/assets/swagger-ui.css")
        assert css.headers["content-type"].startswith("text/css")
        assert "validatorUrl" in (await client.get("/docs")).text  # no badge from the public validator
        assert (await client.get("/docs/oauth2-redirect")).status_code == 200
