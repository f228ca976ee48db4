"""The page at /ui in a real browser (headless Chromium through Selenium) against a real server process
on Redis: pick a user, read the recommendations and why, press "interact", see the history grow and the
list move. Also: /docs and /redoc render from the server's own files, with no request anywhere else.

Without Chromium and its driver (Debian: ``chromium``, ``chromium-driver``) the tests skip, except under
CI (``CI=true``), where they fail. They save the page as a screenshot: where ``MEMREC_UI_SCREENSHOT``
names a file (``reports/ui.png`` for the README), else in the test's own folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import flushed_redis, free_port, skip_or_fail, under_ci
from test_service_support import (  # noqa: F401  (fixtures)
    N_ITEMS,
    model_dir,
    service_redis_url,
    start_server,
    toy_root,
    wait_ready,
)

KEY = "ui-browser-key-7c3a"
SCREENSHOT_ENV = "MEMREC_UI_SCREENSHOT"  # e.g. reports/ui.png: the README's picture
WAIT_S = 30.0
N_SHOWN = 10  # recommendations the page asks for


def all_sources(src: Path, dst: Path) -> Path:
    """A copy of model ``src`` that scores with every source: the fused model, the memory vote (16
    voters) and the transition channel, set by hand in its inference config (validation on the toy
    data may well keep them off)."""
    if not dst.is_dir():
        shutil.copytree(src, dst)
        path = dst / "inference.json"
        config = json.loads(path.read_text())
        config["vote"].update(weight=0.3, temperature=0.1, depth=16)
        config["transitions"].update(weight=0.3)
        path.write_text(json.dumps(config))
    return dst


def every_source_shows(server: str, user: str) -> bool:
    """Whether the vote and the transition channel each give one of ``user``'s top items a visible
    part of its bar (5 % of its probability). Not every user's do: on the toy data a user's voters may
    all name items of their own history, which the list leaves out."""
    answer = httpx.post(
        f"{server}/recommend",
        json={"user_id": user, "n": N_SHOWN, "explain": True},
        headers={"X-API-Key": KEY},
        timeout=10,
    ).json()
    whys = [item["why"] for item in answer["items"]]
    share = [
        {k: w[k] / (w["model"] + w["vote"] + w["transitions"]) for k in ("vote", "transitions")} for w in whys
    ]
    return all(max((s[k] for s in share), default=0.0) > 0.05 for k in ("vote", "transitions"))


def a_user_every_source_reaches(server: str) -> str:
    """A known user for whom :func:`every_source_shows`, from the server's samples."""
    for _ in range(20):
        sample = httpx.get(f"{server}/users/sample?n=50", headers={"X-API-Key": KEY}, timeout=10).json()
        for user in sample["users"]:
            if every_source_shows(server, user):
                return str(user)
    raise AssertionError("no known user whose list the vote and the transitions both reach")


def titles_file(folder: Path) -> Path:
    path = folder / "toy.item"
    rows = [f"i{i}\tToy film {i}\t{1990 + i}" for i in range(N_ITEMS)]
    path.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def server(
    model_dir: Path,  # noqa: F811
    toy_root: Path,  # noqa: F811
    suite_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A server with every source on (fusion, memory vote, transition channel), an API key and titles."""
    model = all_sources(model_dir, toy_root / "ui-all-sources")
    redis_gen = flushed_redis(service_redis_url(suite_redis_url), "ui")
    redis_url = next(redis_gen)
    folder = tmp_path_factory.mktemp("ui")
    log = folder / "api.log"
    port = free_port()
    proc = start_server(model, redis_url, port, log, api_key=KEY, item_titles=str(titles_file(folder)))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        assert f"the page: {base}/ui" in log.read_text()  # what `make run` ends by printing
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        next(redis_gen, None)
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


def chromium_paths() -> tuple[str, str]:
    """The browser and its driver; a skip (a failure under CI) when either is missing."""
    binary = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        skip_or_fail(
            "headless Chromium and chromedriver are needed (apt-get install chromium chromium-driver)",
            under_ci(),
        )
    return binary, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[dev]')", under_ci())
    binary, driver_path = chromium_paths()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1440,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # no driver download
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------ helpers


def wait_for(driver: Any, what: str, condition: Callable[[Any], Any]) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        notice = (
            driver.find_element("css selector", "#notice").text
            if driver.find_elements("css selector", "#notice")
            else ""
        )
        pytest.fail(f"timed out waiting for {what}; page notice: {notice!r}")


def css(driver: Any, selector: str) -> list[Any]:
    return list(driver.find_elements("css selector", selector))


def body_attr(driver: Any, name: str) -> str:
    return str(driver.find_element("css selector", "body").get_attribute(f"data-{name}"))


def rendered(driver: Any, count: int) -> None:
    wait_for(
        driver,
        f"render {count}",
        lambda d: body_attr(d, "renders") == str(count) and body_attr(d, "state") == "ready",
    )


def items(driver: Any, selector: str) -> list[str]:
    return [str(li.get_attribute("data-item")) for li in css(driver, selector)]


def requests_made(driver: Any) -> dict[str, str | None]:
    """URL → why the browser blocked it (None: sent), for the requests since the last call (Chrome's
    performance log)."""
    urls: dict[str, str] = {}
    blocked: dict[str, str] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked[params["requestId"]] = params["blockedReason"]
    return {url: blocked.get(rid) for rid, url in urls.items()}


def severe_console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# -------------------------------------------------------------------------------------------- tests


def test_page_explains_recommendations_and_follows_an_interaction(
    server: str, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(f"{server}/ui")
    # The server has a key: the page says so, and works once it is typed in.
    wait_for(driver, "the key request", lambda d: body_attr(d, "state") == "needs-key")
    assert "API key" in css(driver, "#notice")[0].text
    css(driver, "#api-key")[0].send_keys(KEY, Keys.TAB)
    wait_for(driver, "suggested users", lambda d: css(d, "#user-chips button.user-chip"))
    driver.get_log("browser")  # forget the refused request made before the key was typed

    # The header: model version, K, store backend, links to the docs and the metrics.
    ready = httpx.get(f"{server}/readyz", timeout=5).json()
    field = {el.get_attribute("data-field"): el.text for el in css(driver, "#info dd")}
    assert field["model_version"] == ready["model_version"] and field["dataset"] == "toy"
    assert field["sources"] == "model + memory vote + transitions"
    assert (
        field["k"] == "5"
        and field["store"].startswith("redis")
        and int(field["memories"].replace(",", "")) > 0
    )
    assert css(driver, "#docs-link")[0].get_attribute("href") == f"{server}/docs"
    assert css(driver, "#metrics-link")[0].get_attribute("href") == f"{server}/metrics"

    # Pick a suggested user whose list every source reaches (else one typed in): the history (titles,
    # most recent first), the list, the memories.
    chips = css(driver, "#user-chips button.user-chip")
    chip = next((c for c in chips if every_source_shows(server, c.text)), None)
    if chip is not None:
        user = chip.text
        chip.click()
    else:
        user = a_user_every_source_reaches(server)
        box = css(driver, "#user-input")[0]
        box.clear()
        box.send_keys(user, Keys.ENTER)
    rendered(driver, 1)
    assert css(driver, "#user-input")[0].get_attribute("value") == user
    history = items(driver, "#history li")
    stored = httpx.get(f"{server}/users/{user}/history", headers={"X-API-Key": KEY}, timeout=5).json()
    assert history == [item["item_id"] for item in stored["items"]] and history
    assert all(
        re.match(r"1?\d+\s+Toy film \d+ \(\d{4}\) i\d+$", li.text) for li in css(driver, "#history li")
    )
    recs = items(driver, "#recs li.rec")
    assert len(recs) == N_SHOWN and not set(recs) & set(history)  # seen items are not recommended
    for li in css(driver, "#recs li.rec"):
        assert re.search(r"Toy film \d+ .*score -?\d+\.\d{3}", li.text), li.text
    assert "K used 5" in css(driver, "#rec-meta")[0].text
    assert css(driver, "#memories li[data-memory]"), "retrieved memories are listed"
    assert all(re.search(r"u\d+'s history, after \d+ items", li.text) for li in css(driver, "#memories li"))

    # Why, per item: a bar of the three sources, the encoder's own rank, the memories and recent items
    # behind it. NEEDS THE LEAD'S WIRING of ScoredItem.why in /recommend (explain: true).
    widths: dict[str, list[int]] = {"model": [], "vote": [], "transitions": []}
    for li in css(driver, "#recs li.rec"):
        assert not css(li, ".no-why"), f"no explanation rendered for {li.get_attribute('data-item')}"
        segments = {s.get_attribute("class").split()[-1]: s for s in css(li, ".why .bar .seg")}
        assert set(segments) == set(widths)
        for name, segment in segments.items():
            widths[name].append(segment.size["width"])
        assert re.search(r"p \d\.\d+ = model \d\.\d+ \+ vote \d\.\d+ \+ transitions \d\.\d+", li.text)
        assert re.search(r"encoder alone:\s*#\d+", css(li, ".encoder-rank")[0].text)
    assert all(w > 0 for w in widths["model"]) and max(widths["vote"]) > 0 and max(widths["transitions"]) > 0
    assert css(driver, "#recs .follows .chip.follow"), "no item shows the recent items it follows"
    memory_ids = {li.get_attribute("data-memory") for li in css(driver, "#memories li[data-memory]")}
    supported = css(driver, "#memories li.supporting")
    assert {li.get_attribute("data-memory") for li in supported} <= memory_ids

    # Interact with the top item: it joins the history (first, highlighted) and leaves the list, which
    # moves; the changed positions are marked.
    target = recs[0]
    css(driver, f'#recs li.rec[data-item="{target}"] button.interact')[0].click()
    rendered(driver, 2)
    after = items(driver, "#history li")
    assert after[0] == target and after[1:] == history[: len(after) - 1] and len(after) == len(history) + 1
    assert "fresh" in css(driver, "#history li")[0].get_attribute("class")
    moved = items(driver, "#recs li.rec")
    assert len(moved) == N_SHOWN and target not in moved and moved != recs
    assert css(driver, "#recs li.rec.up, #recs li.rec.down, #recs li.rec.new"), (
        "no position marked as changed"
    )
    assert f"{user} interacted with Toy film" in css(driver, "#notice")[0].text
    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "ui.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # A user typed in, never seen: an empty history and the popular items.
    box = css(driver, "#user-input")[0]
    box.clear()
    box.send_keys("ui-newcomer", Keys.ENTER)
    rendered(driver, 3)
    assert "popular" in css(driver, "#rec-meta")[0].text and not css(driver, "#history li[data-item]")
    assert len(items(driver, "#recs li.rec")) == N_SHOWN
    assert severe_console_errors(driver) == []


def test_docs_render_without_reaching_any_other_site(server: str, browser: Any) -> None:
    driver = browser
    requests_made(driver)  # forget the earlier pages' requests
    driver.get(f"{server}/docs")
    wait_for(driver, "Swagger UI's operations", lambda d: len(css(d, ".swagger-ui .opblock")) >= 5)
    swagger = requests_made(driver)
    assert f"{server}/openapi.json" in swagger and f"{server}/docs/assets/swagger-ui-bundle.js" in swagger
    driver.get(f"{server}/redoc")
    wait_for(
        driver, "ReDoc's operations", lambda d: "/recommend" in d.find_element("css selector", "body").text
    )
    redoc = requests_made(driver)
    assert f"{server}/docs/assets/redoc.standalone.js" in redoc
    # ReDoc's bundle asks for its maker's logo on a CDN: the page's policy stops it in the browser.
    sent = {url: why for url, why in {**swagger, **redoc}.items() if why is None}
    elsewhere = [url for url in sent if not url.startswith((server, "data:", "blob:"))]
    assert elsewhere == [], f"the docs sent requests to other sites: {elsewhere}"
