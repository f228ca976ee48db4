"""The page at ``/ui`` (``/`` redirects to it) and the small JSON endpoints it reads besides
``/recommend`` and ``/interactions``.

The page itself (``service/static``: HTML, CSS and a little JavaScript, no build step, nothing from
elsewhere) holds no data, so it is open; everything it shows comes from the API routes below, which the
app factory puts behind the API key when one is set (the page takes the key in a field and sends it as
``X-API-Key``).
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, Field, StringConstraints

from model.artifact import CONFIG_FILE, INFERENCE_FILE
from model.inference import InferenceConfig
from service.routes.health import READY_TIMEOUT_S
from service.routes.items import ItemNames
from service.schemas import ItemId, Problem, UserId
from service.settings import Settings
from service.state import RuntimeDep
from service.titles import load_titles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE = STATIC_DIR / "ui.html"
SAMPLE_MAX = 50
HISTORY_MAX = 1_000
TITLES_MAX = 1_000
# The page loads its own files and talks to this server only; the browser refuses anything else.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
}


# ------------------------------------------------------------------------------------- what is shown


@dataclass(frozen=True)
class ModelFacts:
    """What the page says about the model, read from its directory: the dataset from ``config.json``,
    K and the channels from the inference config (``inference.json``, or the fine-tune config of a
    directory written before it)."""

    dataset: str = ""
    retrieval: bool = False
    k: int = 0
    vote: bool = False
    transitions: bool = False

    @classmethod
    def read(cls, model_dir: Path) -> ModelFacts:
        try:
            config = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
            inference_file = model_dir / INFERENCE_FILE
            inference = None
            if inference_file.is_file():
                inference = json.loads(inference_file.read_text(encoding="utf-8"))
            return cls.from_config(config, inference)
        except (OSError, ValueError, TypeError, AttributeError):  # the artifact's own load says why
            return cls()

    @classmethod
    def from_config(cls, config: dict[str, Any], inference: dict[str, Any] | None = None) -> ModelFacts:
        dataset = str(config.get("dataset", ""))
        if "fusion" not in config:  # no fusion module: the encoder alone
            return cls(dataset=dataset)
        if inference is not None:
            cfg = InferenceConfig.from_json(inference)
            return cls(dataset, True, cfg.k, cfg.vote.on, cfg.reads_transitions)
        legacy = config.get("finetune", {})
        vote = float(legacy.get("vote_weight", 0.0)) > 0 and int(legacy.get("vote_depth", 0)) > 0
        return cls(
            dataset, True, int(legacy.get("k", 0)), vote, float(legacy.get("transition_weight", 0.0)) > 0
        )


@dataclass(frozen=True)
class UiContext:
    """Built once by the app factory: the model's facts and the item titles (empty without a file)."""

    facts: ModelFacts
    titles: dict[str, str] = field(default_factory=dict)


def build_ui_context(settings: Settings) -> UiContext:
    facts = ModelFacts.read(settings.model_dir)
    return UiContext(facts, load_titles(settings.item_titles, settings.data_dir, facts.dataset))


async def get_ui_context(request: Request) -> UiContext:
    context: UiContext = request.app.state.ui
    return context


UiDep = Annotated[UiContext, Depends(get_ui_context)]


# ---------------------------------------------------------------------------------------- bodies


class UiInfo(BaseModel):
    model_version: str
    dataset: str = Field(description="dataset the model was trained on")
    retrieval: bool = Field(description="memories are retrieved and fused into the user's state")
    k: int = Field(description="memories retrieved per request (0 without retrieval)")
    vote: bool = Field(description="the memory vote is on")
    transitions: bool = Field(description="the transition channel is on")
    store_backend: str = Field(description="'redis' or 'embedded'")
    namespace: str
    memories: int = Field(description="collaborative memories in the store")
    known_users: int = Field(description="users of the model's vocabulary")
    titles: int = Field(description="item titles known (0: the page shows item ids)")
    docs_url: str
    metrics_url: str
    metrics_require_key: bool


class UserSample(BaseModel):
    users: list[UserId] = Field(description="known users, drawn at random")


class HistoryItem(BaseModel):
    item_id: ItemId
    title: str | None = None


class UserHistory(BaseModel):
    user_id: UserId
    items: list[HistoryItem] = Field(description="the stored history, most recent first")


class ItemTitles(BaseModel):
    titles: dict[ItemId, str] = Field(description="title per asked item id that has one")


# ---------------------------------------------------------------------------------------- routes

page = APIRouter(include_in_schema=False)  # open: the page and its files hold no data
api = APIRouter(tags=["ui"], responses={503: {"model": Problem}})  # behind the key when one is set


@page.get("/")
async def root(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/ui", status_code=307)


@page.get("/ui")
async def ui_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers=PAGE_HEADERS)


@api.get("/ui/info", response_model=UiInfo)
async def ui_info(rt: RuntimeDep, ui: UiDep) -> UiInfo:
    """What the page shows in its header: the model, K, the store and where the docs and metrics are."""
    stats = await asyncio.wait_for(rt.store.stats(), READY_TIMEOUT_S)
    facts = ui.facts
    return UiInfo(
        model_version=rt.model_version,
        dataset=facts.dataset,
        retrieval=facts.retrieval,
        k=facts.k,
        vote=facts.vote,
        transitions=facts.transitions,
        store_backend=stats.backend,
        namespace=stats.namespace,
        memories=stats.memories,
        known_users=len(rt.vocab.users),
        titles=len(ui.titles),
        docs_url="docs",
        metrics_url="metrics",
        metrics_require_key=rt.settings.metrics_require_key and rt.settings.api_key is not None,
    )


@api.get("/users/sample", response_model=UserSample)
async def users_sample(
    rt: RuntimeDep, n: Annotated[int, Query(ge=1, le=SAMPLE_MAX, description="how many users")] = 5
) -> UserSample:
    """A few users the model knows whose history the store holds (loaded with the memory bank, and not
    erased since)."""
    users = rt.vocab.users
    drawn = random.sample(users, min(2 * n, len(users)))
    histories = await rt.store.histories(drawn, 1)
    return UserSample(users=[u for u, h in zip(drawn, histories, strict=True) if h][:n])


@api.get("/users/{user_id:path}/history", response_model=UserHistory)  # an id may hold a '/'
async def user_history(
    rt: RuntimeDep,
    ui: UiDep,
    user_id: Annotated[UserId, PathParam(min_length=1, max_length=256)],
    n: Annotated[int, Query(ge=1, le=HISTORY_MAX, description="most recent items returned")] = 50,
) -> UserHistory:
    """The user's stored history, most recent first (empty for a user never seen)."""
    (history,) = await rt.store.histories([user_id], n)
    names = await rt.items.names()
    items = [_external(names, item) for item in reversed(history)]
    return UserHistory(
        user_id=user_id,
        items=[HistoryItem(item_id=i, title=ui.titles.get(i)) for i in items if i is not None],
    )


ItemIdParam = Annotated[str, StringConstraints(min_length=1, max_length=256)]


@api.get("/items/titles", response_model=ItemTitles)
async def item_titles(
    ui: UiDep,
    ids: Annotated[list[ItemIdParam], Query(max_length=TITLES_MAX, description="item ids")] = [],  # noqa: B006
) -> ItemTitles:
    """Titles of the given items, for those the titles file names (none without one)."""
    return ItemTitles(titles={i: ui.titles[i] for i in ids if i in ui.titles})


def _external(names: ItemNames, item: int) -> str | None:
    try:
        return names.external(item)
    except KeyError:  # written by another model version sharing the namespace
        return None
