"""The app factory: ``create_app(settings)`` builds the FastAPI app; the lifespan loads the model, opens
the store, bulk-loads the artifact's memory bank (once per namespace) and starts the micro-batcher."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from memory_store import IndexParams, MemoryStore, StoreConfig, open_store
from model import artifact
from model.predictor import Predictor
from model.transitions import MAX_ORDER
from service.auth import require_api_key
from service.bank import load_bank
from service.errors import install_handlers, store_errors
from service.ingest import Ingestor
from service.metrics import Metrics
from service.middleware import ObserveRequests
from service.pipeline import Pipeline
from service.recommender import serving_predictor
from service.routes import admin, catalogue, health, interactions, recommend, ui, users
from service.routes import metrics as metrics_route
from service.routes.items import ItemIds
from service.schemas import Problem
from service.settings import Settings
from service.state import Runtime
from service.states import fill_states
from service.swap import Swapper
from service.user_memories import UserMemorySetup, user_memory_setup
from service.versions import Outcomes, Versions

log = logging.getLogger(__name__)

STORE_GAUGES_REFRESH_S = 5.0  # with several workers; a scrape refreshes the one it reaches anyway
DOCS_ASSETS = "/docs/assets"  # Swagger UI's and ReDoc's files, from the fastapi-offline package
# Pictures, fonts and requests of the docs pages from this server only: ReDoc's bundle shows a logo it
# loads from its maker's CDN, which the browser skips under this policy.
DOCS_CSP = "img-src 'self' data:; font-src 'self' data:; connect-src 'self'"


def store_config(
    settings: Settings,
    dim: int,
    model_version: str,
    n_items: int,
    second: bool = False,
    user_memories: UserMemorySetup | None = None,
) -> StoreConfig:
    """The store of a model: ``dim`` its state size, ``n_items`` its vocabulary (new items come after);
    ``second``: the second of two versions served side by side (its own namespace); ``user_memories``:
    the model's per-user memories, whose capacity and eviction order the store keeps."""
    config = StoreConfig(
        dim=dim,
        namespace=settings.store_namespace(model_version, second),
        redis_url=settings.redis_url,
        redis_password=settings.redis_password.get_secret_value() if settings.redis_password else None,
        redis_tls_ca_file=settings.redis_tls_ca_file,
        redis_cluster=settings.redis_cluster,
        slot_groups=settings.redis_slot_groups,
        redis_wait_replicas=settings.redis_wait_replicas,
        redis_wait_timeout_ms=settings.redis_wait_timeout_ms,
        data_dir=settings.store_dir,
        capacity=settings.capacity,
        user_capacity=settings.user_capacity,
        max_age_s=settings.memory_max_age_days * 86_400 if settings.memory_max_age_days else None,
        history_len=max(200, settings.history_len),
        recent_width=MAX_ORDER,  # prefix items a memory keeps: the transition channel's order (the model's)
        state_window=settings.history_len,  # the users' encoder states encode what a request encodes
        first_new_item=n_items + 1,  # items registered after training come after the model's
        log_retention_s=settings.log_retention_days * 86_400 if settings.log_retention_days else None,
        index=IndexParams(
            kind=settings.index_kind,
            exact_threshold=settings.exact_threshold,
            nprobe=settings.nprobe,
            threads=settings.torch_threads,
        ),
    )
    if user_memories is None:
        return config
    return replace(config, user_memory_capacity=user_memories.cfg.capacity, quality=user_memories.quality)


def derives_new_items(settings: Settings, predictor: Predictor) -> bool:
    """Whether new items get derived embeddings (``MEMREC_NEW_ITEM_EMBEDDINGS``): by default where the
    model has neither the vote nor the transition channel to rank them by, and where it ranks with
    the learned hybrid, whose weights are fitted on items the model scores: an item without a score
    sits at the row's lowest model term, from which its few transitions rarely lift it past the known
    items (on none of 202 new-item events in the 80 % time cut of ml-100k, reports/service.md,
    ``new_items_cut80_seeds_underived``)."""
    if settings.new_item_embeddings != "auto":
        return settings.new_item_embeddings == "on"
    return predictor.cfg.hybrid is not None or not (predictor.votes or predictor.cfg.reads_transitions)


async def build_runtime(
    settings: Settings, metrics: Metrics, model_dir: Path | None = None, second: bool = False
) -> Runtime:
    """Load everything a replica serves one model version with (the benchmark builds one without
    HTTP): ``model_dir``, by default the settings'; ``second``: the second version side by side."""
    torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.torch_threads)
    model_dir = (model_dir or settings.model_dir).resolve()
    art = await asyncio.to_thread(artifact.load, model_dir, settings.device)
    rec = await asyncio.to_thread(serving_predictor, art, settings.frozen_graphs, settings.new_item_weight)
    umem = user_memory_setup(art)
    dim, version, n_items = art.encoder.cfg.dim, art.model_version, art.vocab.n_items
    config = store_config(settings, dim, version, n_items, second, umem)
    store: MemoryStore = await open_store(config)
    try:
        if settings.load_bank and art.bank is not None:
            await load_bank(store, art.bank, art.vocab, art.first_items, user_memories=umem)
            t0 = time.perf_counter()
            written = await fill_states(store, rec, art.vocab.users, settings.history_len)
            log.info("encoder states of %d known users written in %.1f s", written, time.perf_counter() - t0)
        metrics.observe_store(await store.stats())
    except BaseException:
        await store.close()
        raise
    pipeline = Pipeline(
        rec,
        store,
        metrics,
        history_len=settings.history_len,
        mask_len=config.history_len,
        max_batch=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000.0,
        user_memories=umem,
        new_item_embeddings=derives_new_items(settings, rec),
    )
    ingestor = Ingestor(
        rec, store, metrics, settings.history_len, settings.frozen_memory, umem, config.history_len
    )
    log.info(
        "serving %s (%s, retrieval %s, %s graphs) from namespace %s",
        art.model_version,
        art.dataset,
        "on" if rec.retrieval else "off",
        "frozen" if rec.frozen else "eager",
        config.namespace,
    )
    items = ItemIds(art.vocab, store, accept_new=settings.new_items == "accept")
    return Runtime(settings, art.model_version, model_dir, art.vocab, store, pipeline, ingestor, items)


async def snapshot_now(store: MemoryStore) -> bool:
    """One index snapshot (restarts replay only the log after it); a failure is logged, not raised."""
    try:
        await store.snapshot()
        return True
    except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
        log.warning("index snapshot failed: %s", exc)
        return False


async def snapshot_every(current: Callable[[], Versions], interval_s: float) -> None:
    """Snapshot the index of each version served, every ``interval_s`` (the versions of the moment)."""
    while True:
        await asyncio.sleep(interval_s)
        for rt in current().serving:
            await snapshot_now(rt.store)


async def watch_loop_lag(metrics: Metrics, interval_s: float) -> None:
    """Observe how late a timer of ``interval_s`` fires: the time the event loop was busy elsewhere
    (inline model work, a long callback, the collector). With request latency it tells the tail this
    process causes from the tail the host's scheduling adds."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(interval_s)
        metrics.loop_lag.observe(max(time.perf_counter() - t0 - interval_s, 0.0))


async def refresh_store_gauges(metrics: Metrics, current: Callable[[], Versions], interval_s: float) -> None:
    """Keep this worker's store gauges (the primary version's) current between scrapes. With several
    workers a scrape reads every worker's last values, and a worker that no scrape reached would show a
    stale ingest lag."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            metrics.observe_store(await asyncio.wait_for(current().primary.store.stats(), interval_s))
        except store_errors() as exc:
            log.debug("store stats unavailable: %s", exc)


async def build_versions(settings: Settings, metrics: Metrics) -> Versions:
    """The model version of ``model_dir``, and the one of ``model_dir_b`` beside it when set."""
    if settings.model_dir_b is not None and (
        version := artifact.model_version(settings.model_dir)
    ) == artifact.model_version(settings.model_dir_b):
        raise RuntimeError(f"model_dir_b holds the same model version as model_dir ({version})")
    primary = await build_runtime(settings, metrics)
    if settings.model_dir_b is None:
        return Versions(primary)
    try:
        secondary = await build_runtime(settings, metrics, settings.model_dir_b, second=True)
    except BaseException:
        await primary.store.close()
        raise
    log.info(
        "serving %s to %.1f %% of users and %s to the others",
        secondary.model_version,
        100 * settings.share_b,
        primary.model_version,
    )
    return Versions(primary, secondary, settings.share_b)


def background_jobs(
    settings: Settings, metrics: Metrics, current: Callable[[], Versions], swapper: Swapper
) -> list[Coroutine[Any, Any, None]]:
    """What runs beside the requests, as the settings ask: snapshots, the loop-lag probe, the store
    gauges (several workers), the model path watch."""
    jobs = []
    if settings.snapshot_interval_s > 0:
        jobs.append(snapshot_every(current, settings.snapshot_interval_s))
    if settings.loop_lag_interval_s > 0:
        jobs.append(watch_loop_lag(metrics, settings.loop_lag_interval_s))
    if metrics.shared_dir is not None:
        jobs.append(refresh_store_gauges(metrics, current, STORE_GAUGES_REFRESH_S))
    if settings.model_watch_s > 0:
        jobs.append(swapper.watch(settings.model_watch_s))
    return jobs


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    versions = await build_versions(settings, metrics)
    for rt in versions.runtimes:
        rt.pipeline.start()
        metrics.model_info.labels(rt.model_version).set(1)

    def current() -> Versions:
        served: Versions = app.state.versions
        return served

    def publish(served: Versions) -> None:  # one step of the event loop: a request sees old or new
        app.state.versions, app.state.runtime = served, served.primary

    publish(versions)
    app.state.outcomes = Outcomes(metrics)
    app.state.swapper = swapper = Swapper(
        settings, metrics, current, publish, lambda path: build_runtime(settings, metrics, path)
    )
    # Everything loaded so far (model, vocabulary, index metadata, libraries) lives as long as the
    # process. Frozen, the collector's full passes skip it: unfrozen, each one walked all of it and
    # stalled the event loop for over 100 ms under load.
    gc.collect()
    gc.freeze()
    background = [asyncio.create_task(job) for job in background_jobs(settings, metrics, current, swapper)]
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        async with swapper.stopped():  # no move starts or is left half-way
            versions = current()
            app.state.runtime = app.state.versions = None
            await swapper.close()
            for rt in versions.runtimes:
                await rt.pipeline.stop()
                if settings.snapshot_interval_s > 0:
                    await snapshot_now(rt.store)  # the next start replays only what comes after
                await rt.store.close()
        gc.unfreeze()  # a process that builds another app (tests) can collect this one


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; settings default to the environment (``MEMREC_*``)."""
    settings = settings or Settings()  # type: ignore[call-arg]  # model_dir comes from the environment
    metrics = Metrics()
    app = FastAPI(
        title="memrec",
        summary="Online retrieval-augmented sequential recommendation",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs from local files instead of a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.ui = ui.build_ui_context(settings)
    app.state.metrics = metrics
    app.state.runtime = app.state.versions = None
    install_handlers(app, metrics)
    app.add_middleware(ObserveRequests, metrics=metrics, max_body_bytes=settings.max_request_bytes)
    # With a key configured the API routes (and, if asked, /metrics) require it, and the OpenAPI
    # document says so; without one they are open and the document declares no security.
    keyed: dict[str, Any] = {}
    if settings.api_key is not None:
        keyed = {"dependencies": [Depends(require_api_key)], "responses": {401: {"model": Problem}}}
    app.include_router(recommend.router, **keyed)
    app.include_router(interactions.router, **keyed)
    app.include_router(catalogue.router, **keyed)
    app.include_router(users.router, **keyed)
    app.include_router(admin.router, **keyed)
    app.include_router(health.router)
    app.include_router(metrics_route.router, **(keyed if settings.metrics_require_key else {}))
    app.include_router(ui.api, **keyed)
    app.include_router(ui.page)
    app.mount("/ui/static", StaticFiles(directory=ui.STATIC_DIR), name="ui-static")
    install_docs(app)
    return app


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's files as the fastapi-offline package ships them."""
    package = importlib.util.find_spec("fastapi_offline")
    if package is None or package.origin is None:
        raise RuntimeError("the fastapi-offline package (the docs' assets) is not installed")
    return Path(package.origin).parent / "static"


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their JavaScript, CSS and icon served by the app itself, so the
    documentation works without reaching any other site (FastAPI's defaults load them from a CDN)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the public validator
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page
